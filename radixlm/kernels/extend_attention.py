"""Extend (prefill) attention over a ragged batch whose K/V, cached prefix and new tokens alike, sit in the
paged KV pool.

One program owns ``BLOCK_M`` consecutive new tokens of one request and one query head.  Its key loop runs in
two phases: keys before the block's first query position are visible to every row (no causal mask), keys from
there up to the block's last query position get the causal mask.  Keys past the block are never read, so the
work follows the causal triangle.

With a custom mask (speculative-decoding verification of a draft tree) the phases are the cached prefix,
visible to every row, and then all of the request's new tokens, each row seeing those its mask allows.

Keys may be wider than values (DeepSeek MLA's latent cache: 576-wide keys, values its first 512 dims); the key
width is split into two power-of-two blocks as in decode (``head_blocks``).  An FP8 cache is dequantized as in
decode: its tiles are converted to fp16 as they load (q scaled by the softmax scale, then cast), the K scale
multiplies the logits and the V scale the output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixlm.kernels.decode_attention import LOG2E, head_blocks, kv_compute, v_is_k_prefix


@triton.jit
def _attend_key_block(
    acc, l_i, m_i, q, q_pe, K, V, row_slots, kv_head_off_k, kv_head_off_v, stride_kn, stride_vn,
    offs_d, mask_d, offs_dpe, mask_dpe, offs_dv, mask_dv, start_n, kv_end, q_pos, window, qk_scale,
    mask_rows, mask_m, prefix,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, CUSTOM_MASK: tl.constexpr, HAS_WINDOW: tl.constexpr,
    BLOCK_DPE: tl.constexpr, V_FROM_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step over keys ``start_n .. start_n + BLOCK_N - 1`` (those ``< kv_end``).  With
    CUSTOM_MASK the keys are new tokens and row r sees key n where ``mask_rows[r, 0][n - prefix]`` is set.  K/V
    tiles are converted to q's dtype, the compute dtype (a no-op unless the cache is FP8)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    mask_n = offs_n < kv_end
    slots = tl.load(row_slots + offs_n, mask=mask_n, other=0).to(tl.int64)  # int64: slot * stride may pass 2^31
    k_rows = K + kv_head_off_k + slots[:, None] * stride_kn
    k = tl.load(k_rows + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
    if BLOCK_DPE > 0:  # the key dims past the main block
        k_pe = tl.load(k_rows + offs_dpe[None, :], mask=mask_n[:, None] & mask_dpe[None, :], other=0.0).to(q.dtype)
        s += tl.dot(q_pe, tl.trans(k_pe), input_precision=DOT_PRECISION)
    s = s * qk_scale
    allowed = mask_n[None, :]
    if CAUSAL:
        allowed = allowed & (offs_n[None, :] <= q_pos[:, None])
    if CUSTOM_MASK:
        visible = tl.load(mask_rows + (offs_n - prefix)[None, :], mask=mask_m[:, None] & mask_n[None, :], other=0)
        allowed = allowed & (visible != 0)
    if HAS_WINDOW:
        allowed = allowed & (offs_n[None, :] > q_pos[:, None] - window)
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # Under a sliding window or a custom mask a row may have seen no key yet (m = -inf); shifting by 0 keeps p and
    # alpha at 0 instead of exp2(-inf + inf) = NaN.
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if V_FROM_K:  # V is the main K block itself (BLOCK_DV == BLOCK_D == Dv): no second load of the same bytes
        v = k
    else:
        v = tl.load(V + kv_head_off_v + slots[:, None] * stride_vn + offs_dv[None, :],
                    mask=mask_n[:, None] & mask_dv[None, :], other=0.0).to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _extend_kernel(
    Q, K, V, O, ReqToToken, ReqPoolIndices, PrefixLens, ExtendLens, ExtendStarts, CustomMask, MaskIndptr,
    KScale, VScale,  # [1] float32 each when KV_FP8: x = stored * scale
    qk_scale,  # sm_scale * log2(e): logits live in base 2 so that exp2 does the softmax
    window,  # attend only to keys within ``window`` of the query position when HAS_WINDOW
    stride_qt, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_ot, stride_oh, stride_rt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DPE: tl.constexpr, BLOCK_DV: tl.constexpr, V_FROM_K: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, USE_CUSTOM_MASK: tl.constexpr, KV_FP8: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    head = tl.program_id(1)
    # The last query blocks have the most keys: hand them out first so the long programs do not form the tail.
    m_block = tl.num_programs(2) - 1 - tl.program_id(2)
    extend_len = tl.load(ExtendLens + b).to(tl.int32)
    if m_block * BLOCK_M >= extend_len:
        return
    prefix = tl.load(PrefixLens + b).to(tl.int32)
    first_tok = tl.load(ExtendStarts + b)
    row_slots = ReqToToken + tl.load(ReqPoolIndices + b) * stride_rt
    kv_head = head // GROUP

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < extend_len
    q_pos = prefix + offs_m
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_dv = offs_dv < HEAD_DIM_V
    # The dots run in the cache's dtype, an FP8 cache's in fp16 (fp32 for fp32 queries; ``kv_compute``), its
    # tiles converted as they load.  There q is multiplied by the softmax scale before its cast (fp16 then overflows only past ~7e5 x
    # sqrt(head_dim)), and q (K_stored k_scale)^T = (q K_stored^T) k_scale: the K scale scales the logits.
    compute_ty = K.dtype.element_ty
    q_mul = qk_scale
    if KV_FP8:
        compute_ty = tl.float32 if Q.dtype.element_ty == tl.float32 else tl.float16
        qk_scale = tl.load(KScale)
    q_rows = Q + (first_tok + offs_m)[:, None] * stride_qt + head * stride_qh
    q = tl.load(q_rows + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :],
                other=0.0)  # [BLOCK_M, BLOCK_D]
    if KV_FP8:
        q = q.to(tl.float32) * q_mul
    q = q.to(compute_ty)
    offs_dpe = None
    mask_dpe = None
    q_pe = None
    if BLOCK_DPE > 0:  # the key dims past the main block
        offs_dpe = BLOCK_D + tl.arange(0, BLOCK_DPE)
        mask_dpe = offs_dpe < HEAD_DIM
        q_pe = tl.load(q_rows + offs_dpe[None, :], mask=mask_m[:, None] & mask_dpe[None, :],
                       other=0.0)  # [BLOCK_M, BLOCK_DPE]
        if KV_FP8:
            q_pe = q_pe.to(tl.float32) * q_mul
        q_pe = q_pe.to(compute_ty)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    diag = prefix + m_block * BLOCK_M  # first query position of the block
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(diag - window + 1, 0)
    if USE_CUSTOM_MASK:
        # The cached prefix is visible to every row; then every new key, each row through its mask row.
        for start_n in range(lo, prefix, BLOCK_N):
            acc, l_i, m_i = _attend_key_block(
                acc, l_i, m_i, q, q_pe, K, V, row_slots, kv_head * stride_kh, kv_head * stride_vh, stride_kn,
                stride_vn, offs_d, mask_d, offs_dpe, mask_dpe, offs_dv, mask_dv, start_n, prefix, q_pos, window,
                qk_scale, None, mask_m, prefix,
                BLOCK_N=BLOCK_N, CAUSAL=False, CUSTOM_MASK=False, HAS_WINDOW=HAS_WINDOW, BLOCK_DPE=BLOCK_DPE,
                V_FROM_K=V_FROM_K, DOT_PRECISION=DOT_PRECISION,
            )
        # [BLOCK_M, 1] row starts; in-block offsets in int32 (a request's mask holds extend_len^2 < 2^31 entries)
        mask_rows = CustomMask + tl.load(MaskIndptr + b) + (offs_m * extend_len)[:, None]
        for start_n in range(tl.maximum(lo, prefix), prefix + extend_len, BLOCK_N):
            acc, l_i, m_i = _attend_key_block(
                acc, l_i, m_i, q, q_pe, K, V, row_slots, kv_head * stride_kh, kv_head * stride_vh, stride_kn,
                stride_vn, offs_d, mask_d, offs_dpe, mask_dpe, offs_dv, mask_dv, start_n, prefix + extend_len, q_pos,
                window, qk_scale, mask_rows, mask_m, prefix,
                BLOCK_N=BLOCK_N, CAUSAL=False, CUSTOM_MASK=True, HAS_WINDOW=HAS_WINDOW, BLOCK_DPE=BLOCK_DPE,
                V_FROM_K=V_FROM_K, DOT_PRECISION=DOT_PRECISION,
            )
    else:
        for start_n in range(lo, diag, BLOCK_N):
            acc, l_i, m_i = _attend_key_block(
                acc, l_i, m_i, q, q_pe, K, V, row_slots, kv_head * stride_kh, kv_head * stride_vh, stride_kn,
                stride_vn, offs_d, mask_d, offs_dpe, mask_dpe, offs_dv, mask_dv, start_n, diag, q_pos, window,
                qk_scale, None, mask_m, prefix,
                BLOCK_N=BLOCK_N, CAUSAL=False, CUSTOM_MASK=False, HAS_WINDOW=HAS_WINDOW, BLOCK_DPE=BLOCK_DPE,
                V_FROM_K=V_FROM_K, DOT_PRECISION=DOT_PRECISION,
            )
        hi = tl.minimum(prefix + extend_len, diag + BLOCK_M)
        for start_n in range(diag, hi, BLOCK_N):
            acc, l_i, m_i = _attend_key_block(
                acc, l_i, m_i, q, q_pe, K, V, row_slots, kv_head * stride_kh, kv_head * stride_vh, stride_kn,
                stride_vn, offs_d, mask_d, offs_dpe, mask_dpe, offs_dv, mask_dv, start_n, hi, q_pos, window,
                qk_scale, None, mask_m, prefix,
                BLOCK_N=BLOCK_N, CAUSAL=True, CUSTOM_MASK=False, HAS_WINDOW=HAS_WINDOW, BLOCK_DPE=BLOCK_DPE,
                V_FROM_K=V_FROM_K, DOT_PRECISION=DOT_PRECISION,
            )
    # Every real row has seen at least its own key (l_i > 0); only padding rows past the window can have none.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    if KV_FP8:  # P (V_stored v_scale) = (P V_stored) v_scale: the V scale multiplies the output
        out = out * tl.load(VScale)
    tl.store(O + (first_tok + offs_m)[:, None] * stride_ot + head * stride_oh + offs_dv[None, :],
             out.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_dv[None, :])


def extend_attention_fwd(
    q: torch.Tensor,  # [num_tokens, num_heads, Dk]
    k_buffer: torch.Tensor,  # [num_slots, num_kv_heads, Dk]
    v_buffer: torch.Tensor,  # [num_slots, num_kv_heads, Dv], Dv <= Dk; may be a view into k_buffer
    o: torch.Tensor,  # [num_tokens, num_heads, Dv], written
    req_to_token: torch.Tensor,  # [max_reqs, max_context] int32
    req_pool_indices: torch.Tensor,  # [bs] int64
    extend_prefix_lens: torch.Tensor,  # [bs] int64
    extend_seq_lens: torch.Tensor,  # [bs] int64
    extend_start_loc: torch.Tensor,  # [bs] int64
    max_extend_len: int,
    sm_scale: float,
    sliding_window: int | None = None,
    custom_mask: torch.Tensor | None = None,  # [sum(extend_seq_lens[i]^2)] bool or uint8
    mask_indptr: torch.Tensor | None = None,  # [bs] int64: where request i's block of custom_mask starts
    k_scale: torch.Tensor | None = None,  # [1] float32, an FP8 cache's: k = k_buffer * k_scale
    v_scale: torch.Tensor | None = None,  # [1] float32, an FP8 cache's: v = v_buffer * v_scale
) -> None:
    """New token j of request i (query row ``extend_start_loc[i] + j``, position ``p = extend_prefix_lens[i] + j``)
    attends to the request's keys at positions ``<= p`` (and ``> p - sliding_window`` when given), read through
    ``req_to_token[req_pool_indices[i]]``; every key, prefix and new, must already be in the pool.

    With ``custom_mask`` (speculative-decoding verification, e.g. a tree of draft tokens), the mask replaces the
    causal rule among the new tokens: request i's block ``custom_mask[mask_indptr[i] :][: n * n]``, with
    ``n = extend_seq_lens[i]``, is a row-major ``[n, n]`` matrix whose entry ``[a, b]`` says whether new token
    ``a`` may attend to new token ``b`` (any pattern, not only lower-triangular).  The cached prefix stays
    visible to every new token.  Precondition: every row allows at least its own token (``[a, a]`` set).  A
    sliding window still applies to every key, measured by position in the request's KV order (``prefix + j``).

    Keys and queries are ``Dk`` wide, values and outputs ``Dv <= Dk`` wide (DeepSeek MLA with absorbed weights:
    ``k_buffer [num_slots, 1, 576]``, ``v_buffer = k_buffer[..., :512]``).  ``max_extend_len >=
    max(extend_seq_lens)`` sizes the grid.  q, o and the KV buffers need a unit stride in the last dimension (the KV
    buffers any strides in the first two); the KV buffers may be fp32, fp16 or bf16 (q is cast to their dtype), or
    FP8 with ``k_scale`` and ``v_scale`` (the buffers hold ``x / scale``; computed in fp16; MLA passes the
    latent's scale as both), o has q's dtype.
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_buffer.shape[1]
    head_dim_v = v_buffer.shape[2]
    bs = req_pool_indices.shape[0]
    assert q.stride(2) == 1 and o.stride(2) == 1 and num_heads % num_kv_heads == 0
    assert k_buffer.stride(2) == 1 and v_buffer.stride(2) == 1
    assert k_buffer.shape[2] == head_dim and head_dim_v <= head_dim and o.shape[2] == head_dim_v
    use_mask = custom_mask is not None
    if use_mask:
        assert mask_indptr is not None and mask_indptr.shape[0] == bs, "custom_mask needs mask_indptr [bs]"
        if custom_mask.dtype == torch.bool:
            custom_mask = custom_mask.view(torch.uint8)  # same bytes; loads as 0/1 in the kernel
        assert custom_mask.dtype == torch.uint8 and custom_mask.dim() == 1
    block_d, block_dpe, block_dv = head_blocks(head_dim, head_dim_v)
    fp8, compute_dtype, precision = kv_compute(q, k_buffer, k_scale, v_scale)
    tile_bytes = compute_dtype.itemsize  # an FP8 tile becomes a compute_dtype tile in registers
    if head_dim == head_dim_v:
        block_m, block_n, num_warps, num_stages = _launch_config(block_d, tile_bytes, max_extend_len)
    else:
        block_m, block_n, num_warps, num_stages = _launch_config_split(block_d + block_dpe, block_dv, tile_bytes,
                                                                       max_extend_len)
    grid = (bs, num_heads, triton.cdiv(max_extend_len, block_m))
    _extend_kernel[grid](
        q, k_buffer, v_buffer, o, req_to_token, req_pool_indices, extend_prefix_lens, extend_seq_lens,
        extend_start_loc, custom_mask, mask_indptr, k_scale, v_scale, sm_scale * LOG2E, sliding_window or 0,
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        o.stride(0), o.stride(1), req_to_token.stride(0),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_D=block_d,
        BLOCK_DPE=block_dpe, BLOCK_DV=block_dv, V_FROM_K=v_is_k_prefix(k_buffer, v_buffer, block_d, block_dpe),
        BLOCK_M=block_m, BLOCK_N=block_n, HAS_WINDOW=sliding_window is not None, USE_CUSTOM_MASK=use_mask,
        KV_FP8=fp8, DOT_PRECISION=precision, num_warps=num_warps, num_stages=num_stages,
    )


def _launch_config(block_d: int, elem_bytes: int, max_extend_len: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages), from H100 sweeps over Llama-3.1-8B shapes (bf16, head_dim 128):
    128-row query blocks run long prefills at ~350 TFLOP/s against ~190 for 64-row ones, while short extends
    fill the GPU better with 64-row blocks and a deeper pipeline."""
    if block_d > 128 or elem_bytes == 4:  # large tiles: keep K/V stages and the accumulator within SM limits
        return 64, 32, 4, 2
    if max_extend_len >= 1024:
        return 128, 64, 4, 2
    return 64, 32, 4, 3


def _launch_config_split(block_k: int, block_dv: int, elem_bytes: int,
                         max_extend_len: int) -> tuple[int, int, int, int]:
    """The launch for keys wider than values, ``block_k`` the two key blocks together.  Not timed on a GPU: sized by
    what ptxas reports for sm_90 (Triton 3.9).  MLA's 576-wide keys with 512-wide values: 32-row query blocks over
    8 warps keep the [32, 512] fp32 accumulator and the [32, 576] q tile in registers (bf16: 180-190 a thread, no
    spills; SGLang also runs these widths with 32-row blocks on Hopper), and two stages of 32-key tiles take 76 KB
    of shared memory with V a view of K (its tile reused) or 109 KB with a separate V; fp32 caches take 16-key
    tiles (113 / 146 KB)."""
    if block_k > 256 or block_dv > 256:
        return 32, (32 if elem_bytes <= 2 else 16), 8, 2
    return _launch_config(max(block_k, block_dv), elem_bytes, max_extend_len)
