"""Paged decode attention, flash-decoding style: one new query token per request over its whole KV sequence.

Stage 1 splits each request's keys into ``num_kv_splits`` contiguous ranges and attends to every range in its
own program, so a small batch with long contexts still fills the GPU; one program serves a tile of up to
``BLOCK_H`` query heads of one KV head (GQA), reading that head's K/V once per tile.  Each range leaves a
normalised partial output and its log-sum-exp in caller-owned fp32 scratch; stage 2 merges the ranges of every
(request, head) with those log-sum-exps.

The split count is the scratch's, fixed per launch (a CUDA graph replays one launch): ``plan_decode_splits``
picks it on the host from what is known at capture time (batch size, head tiles, the longest possible context,
the SM count), so that a batch of one MLA request still runs >= ~2 programs per SM.  Inside the kernel a split
covers at least ``min_split_len`` keys, so a short sequence under a large split count leaves trailing splits
empty (they cost a launch slot and no memory traffic) instead of running many one-block programs whose partial
outputs would cost as many bytes as the keys they read.

Keys and values may differ in width (``Dk >= Dv``), and V may be a strided view into the K buffer: DeepSeek's
Multi-head Latent Attention keeps one 576-wide vector per token (512 latent dims, then 64 rotary ones) that is
the key whole and the value by its first 512 dims.  A key width that is not a power of two is split into a
power-of-two main block and a smaller power-of-two remainder (576 = 512 + 64, SGLang's BLOCK_DMODEL and
BLOCK_DPE) whose two dot products are summed, instead of one block padded to 1024; see ``head_blocks``.

An FP8 cache (``float8_e4m3fn`` / ``float8_e5m2``, values ``x / scale``) is loaded as FP8 and converted in
registers to fp16 (fp32 for fp32 queries), which the dots then run in (sm_90 widens a pair of E4M3 values to fp16 in one instruction;
to bf16 takes several, and converting to the query's bf16 made FP8 reads slower than bf16 ones: GPU run H), with
the query pre-scaled by the softmax scale; an FP8 key block holds twice the keys of a 16-bit one (the same bytes
per iteration).  The layer's K scale multiplies the logits and its V scale the split's output (both scales are
one float32 each, read in the kernel: nothing extra passes over the cache, nothing is read on the host).  ``kv_compute`` gives that dtype choice to the launch code of both kernels.

Stage 2 can hand the output straight to an FP8 linear (the o projection): given ``o_scale`` it writes ``o`` in
E4M3 with one scale per token per group of channels (groups within a head), the bits of writing the output and
then running ``fp8_gemm``'s group quantizer over it, one launch fewer.

Nothing here reads a device value on the host or allocates, so a decode step can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixlm.kernels.fp8 import FP8_DTYPE, FP8_MAX, SCALE_EPS
from radixlm.kernels.fused_quant import TL_DTYPES, quantize_e4m3
from radixlm.kernels.pdl import pdl_launch_kwargs, pdl_trigger, pdl_wait

LOG2E = 1.4426950408889634
_LN2 = tl.constexpr(0.6931471805599453)
_MIN_BLOCK_H = 16  # tl.dot needs at least 16 rows; smaller GQA groups are padded with masked heads
_MIN_BLOCK_DPE = 16  # tl.dot's smallest reduction width
# The split plan (``plan_decode_splits``): enough programs to keep every SM busy with two resident programs (one
# waits on memory while the other computes), at most MAX_KV_SPLITS ranges (stage 2 reads their log-sum-exps in one
# tile), never fewer than the default 8 (what every batch size ran before the plan; large batches keep it).
TARGET_PROGRAMS_PER_SM = 2
DEFAULT_KV_SPLITS = 8
MAX_KV_SPLITS = 128
# Least keys per non-empty split of an MLA launch: a 16-head tile's partial output is 16 x 512 fp32 = 32 KB, the
# bytes of ~28 latent rows (576 bf16); with >= 128 keys a split reads >= 4.5x the bytes it writes to scratch.
MLA_MIN_SPLIT_LEN = 128
# Software-pipeline depth of stage 1's key loop; one more for FP8 GQA caches (GPU run H: 1.2-1.5x with fp16
# tiles and doubled key blocks; MLA-wide FP8 tiles ran slower with it).
SPLIT_STAGES = 2
_MERGE_TILE = 4096  # elements of partial outputs stage 2 holds at once: [8 splits, 512] or [32, 128]


def head_blocks(head_dim_k: int, head_dim_v: int) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_DPE, BLOCK_DV): the key width as a power-of-two main block ``BLOCK_D`` plus, when that
    saves work, a power-of-two remainder block ``BLOCK_DPE`` (0: none) starting at ``BLOCK_D``; and the value
    block.  Equal widths keep one block of ``next_power_of_2(head_dim)`` for both, as before unequal widths were
    supported, so those launches are unchanged.  576 -> 512 + 64 (half the loads and dot work of 1024);
    192 (DeepSeek's decompressed 128 + 64) -> 128 + 64; 96 -> 64 + 32."""
    full = triton.next_power_of_2(head_dim_k)
    block_dv = triton.next_power_of_2(head_dim_v)
    if head_dim_k == head_dim_v or full == head_dim_k:
        return full, 0, block_dv
    main = full // 2
    rest = max(triton.next_power_of_2(head_dim_k - main), _MIN_BLOCK_DPE)
    if main + rest >= full:  # e.g. 112 = 64 + 48 -> 64 + 64: no saving
        return full, 0, block_dv
    return main, rest, block_dv


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def kv_compute(q: torch.Tensor, k_buffer: torch.Tensor, k_scale: torch.Tensor | None,
               v_scale: torch.Tensor | None) -> tuple[bool, torch.dtype, str]:
    """(KV_FP8, the dtype the dots run in, their input precision) of a launch.  An FP8 cache needs both scales
    (float32, one element each) and computes in fp16 (q scaled, then cast), or in fp32 for fp32 queries; any
    other cache in its own (q is cast)."""
    fp8 = k_buffer.dtype in FP8_DTYPES
    if fp8:
        assert k_scale is not None and v_scale is not None, "an FP8 KV cache needs its layer's k_scale and v_scale"
        assert k_scale.dtype == v_scale.dtype == torch.float32 and k_scale.numel() == v_scale.numel() == 1
    else:
        assert k_scale is None and v_scale is None, "scales go with an FP8 KV cache"
    dtype = (torch.float32 if q.dtype == torch.float32 else torch.float16) if fp8 else k_buffer.dtype
    return fp8, dtype, ("ieee" if dtype == torch.float32 else "tf32")  # tf32 would cost fp32 caches ~1e-3


def v_is_k_prefix(k_buffer: torch.Tensor, v_buffer: torch.Tensor, block_d: int, block_dpe: int) -> bool:
    """Whether V is exactly the first ``block_d`` dims of the K rows (the MLA latent ``k_buffer[..., :512]``), so
    the kernels can use the main K tile as the V tile instead of loading the same bytes a second time."""
    return (block_dpe > 0 and v_buffer.shape[-1] == block_d and v_buffer.data_ptr() == k_buffer.data_ptr()
            and v_buffer.dtype == k_buffer.dtype and v_buffer.stride()[:2] == k_buffer.stride()[:2])


@triton.jit
def _decode_split_kernel(
    Q, K, V, ReqToToken, ReqPoolIndices, SeqLens, MidO, MidLse,
    KScale, VScale,  # [1] float32 each when KV_FP8: x = stored * scale
    qk_scale,  # sm_scale * log2(e): logits live in base 2 so that exp2 does the softmax
    window,  # attend only to the last ``window`` keys when HAS_WINDOW
    stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_rt,
    stride_mb, stride_mh, stride_ms, stride_lb, stride_lh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DPE: tl.constexpr, BLOCK_DV: tl.constexpr, V_FROM_K: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, MIN_SPLIT_LEN: tl.constexpr, HAS_WINDOW: tl.constexpr,
    KV_FP8: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr,
):
    pdl_wait(PDL)
    b = tl.program_id(0)
    head_blocks: tl.constexpr = (GROUP + BLOCK_H - 1) // BLOCK_H
    kv_head = tl.program_id(1) // head_blocks
    split = tl.program_id(2)

    offs_g = (tl.program_id(1) % head_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)  # index within the GQA group
    mask_h = offs_g < GROUP
    heads = kv_head * GROUP + offs_g
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_dv = offs_dv < HEAD_DIM_V

    seq_len = tl.load(SeqLens + b).to(tl.int32)
    row_slots = ReqToToken + tl.load(ReqPoolIndices + b) * stride_rt
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(seq_len - window, 0)
    # Splits share the attended range evenly in whole key blocks, each at least MIN_SPLIT_LEN keys (a multiple of
    # BLOCK_N); trailing splits of a short range are empty.
    split_len = tl.maximum(tl.cdiv(tl.cdiv(seq_len - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N, MIN_SPLIT_LEN)
    start = lo + split * split_len
    end = tl.minimum(start + split_len, seq_len)

    # The dots run in the cache's dtype, an FP8 cache's in fp16 (fp32 for fp32 queries; ``kv_compute``), its
    # tiles converted as they load.  There q is multiplied by the softmax scale before its cast (fp16 then overflows only past ~7e5 x
    # sqrt(head_dim)), and q (K_stored k_scale)^T = (q K_stored^T) k_scale: the K scale scales the logits.
    compute_ty = K.dtype.element_ty
    q_mul = qk_scale
    if KV_FP8:
        compute_ty = tl.float32 if Q.dtype.element_ty == tl.float32 else tl.float16
        qk_scale = tl.load(KScale)
    q_rows = Q + b * stride_qb + heads[:, None] * stride_qh
    q = tl.load(q_rows + offs_d[None, :], mask=mask_h[:, None] & mask_d[None, :],
                other=0.0)  # [BLOCK_H, BLOCK_D]
    if KV_FP8:
        q = q.to(tl.float32) * q_mul
    q = q.to(compute_ty)
    if BLOCK_DPE > 0:  # the key dims past the main block
        offs_dpe = BLOCK_D + tl.arange(0, BLOCK_DPE)
        mask_dpe = offs_dpe < HEAD_DIM
        q_pe = tl.load(q_rows + offs_dpe[None, :], mask=mask_h[:, None] & mask_dpe[None, :],
                       other=0.0)  # [BLOCK_H, BLOCK_DPE]
        if KV_FP8:
            q_pe = q_pe.to(tl.float32) * q_mul
        q_pe = q_pe.to(compute_ty)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        slots = tl.load(row_slots + offs_n, mask=mask_n, other=0).to(tl.int64)  # int64: slot * stride may pass 2^31
        k_rows = K + slots[:, None] * stride_kn + kv_head * stride_kh
        k = tl.load(k_rows + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(compute_ty)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_H, BLOCK_N]
        if BLOCK_DPE > 0:
            k_pe = tl.load(k_rows + offs_dpe[None, :], mask=mask_n[:, None] & mask_dpe[None, :],
                           other=0.0).to(compute_ty)
            s += tl.dot(q_pe, tl.trans(k_pe), input_precision=DOT_PRECISION)
        s = tl.where(mask_n[None, :], s * qk_scale, float("-inf"))
        # Every block holds at least one key, so m_new is finite and no row turns NaN.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if V_FROM_K:  # V is the main K block itself (BLOCK_DV == BLOCK_D == HEAD_DIM_V): no second load
            v = k
        else:
            v = tl.load(V + slots[:, None] * stride_vn + kv_head * stride_vh + offs_dv[None, :],
                        mask=mask_n[:, None] & mask_dv[None, :], other=0.0).to(compute_ty)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    pdl_trigger(PDL)  # after the stream over the cache (``radixlm.kernels.pdl``)

    # An empty split leaves a zero output and LSE -inf: weight 0 in the merge.
    nonempty = l_i > 0.0
    l_safe = tl.where(nonempty, l_i, 1.0)
    out = acc / l_safe[:, None]
    if KV_FP8:  # P (V_stored v_scale) = (P V_stored) v_scale: the V scale multiplies the output (the merge is linear)
        out = out * tl.load(VScale)
    tl.store(MidO + b * stride_mb + heads[:, None] * stride_mh + split * stride_ms + offs_dv[None, :], out,
             mask=mask_h[:, None] & mask_dv[None, :])
    lse = tl.where(nonempty, (m_i + tl.log2(l_safe)) * _LN2, float("-inf"))  # natural log
    tl.store(MidLse + b * stride_lb + heads * stride_lh + split, lse, mask=mask_h)


@triton.jit
def _decode_merge_kernel(
    MidO, MidLse, O, OScale,
    stride_mb, stride_mh, stride_ms, stride_lb, stride_lh, stride_ob, stride_oh, stride_sb, scale_eps, fp8_max,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
    CHUNK_S: tl.constexpr, QUANT_GROUP: tl.constexpr, OUT_DTYPE: tl.constexpr, PDL: tl.constexpr,
):
    # QUANT_GROUP > 0: O is E4M3, the output (rounded to OUT_DTYPE first, as if written) quantized per group of
    # QUANT_GROUP channels (BLOCK_D == HEAD_DIM, a multiple of it), the group scales at OScale[b, h * groups + g].
    pdl_trigger(PDL)
    pdl_wait(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    lse_row = MidLse + b * stride_lb + h * stride_lh
    lse = tl.load(lse_row + offs_s, mask=offs_s < NUM_SPLITS, other=float("-inf"))  # [BLOCK_S]
    # Split 0 is never empty (seq_len >= 1), so the max is finite and empty splits get weight exp(-inf) = 0.
    lse_max = tl.max(lse, 0)
    total = tl.sum(tl.exp(lse - lse_max), 0)
    out = tl.zeros([BLOCK_D], tl.float32)
    # CHUNK_S partial outputs at a time keep the tile in registers however many splits there are.
    for s0 in range(0, NUM_SPLITS, CHUNK_S):
        offs_c = s0 + tl.arange(0, CHUNK_S)
        lse_c = tl.load(lse_row + offs_c, mask=offs_c < NUM_SPLITS, other=float("-inf"))
        live = lse_c > float("-inf")  # empty splits wrote no useful output: skip their bytes
        parts = tl.load(MidO + b * stride_mb + h * stride_mh + offs_c[:, None] * stride_ms + offs_d[None, :],
                        mask=live[:, None] & mask_d[None, :], other=0.0)  # [CHUNK_S, BLOCK_D]
        out += tl.sum(parts * tl.exp(lse_c - lse_max)[:, None], 0)
    o_row = O + b * stride_ob + h * stride_oh
    if QUANT_GROUP == 0:
        tl.store(o_row + offs_d, (out / total).to(O.dtype.element_ty), mask=mask_d)
    else:
        groups: tl.constexpr = BLOCK_D // QUANT_GROUP
        y = tl.reshape((out / total).to(OUT_DTYPE).to(tl.float32), [groups, QUANT_GROUP])
        scales = tl.math.div_rn(tl.maximum(tl.max(tl.abs(y), axis=1), scale_eps), fp8_max)  # [groups]
        y_q = quantize_e4m3(y, scales[:, None], fp8_max)
        tl.store(o_row + offs_d, tl.reshape(y_q, [BLOCK_D]).to(O.dtype.element_ty))
        tl.store(OScale + b * stride_sb + h * groups + tl.arange(0, groups), scales)


def decode_launch(group: int, head_dim: int, head_dim_v: int, elem_bytes: int) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_N) of stage 1 for a GQA group of ``group`` query heads per KV head: the query heads of a
    KV head are served in ``cdiv(group, BLOCK_H)`` tiles."""
    block_d, block_dpe, _ = head_blocks(head_dim, head_dim_v)
    if head_dim != head_dim_v and block_d + block_dpe > 256:
        # MLA-wide keys (576): a 16-head tile keeps the [BLOCK_H, Dv] fp32 accumulator and the q tile in registers
        # (SGLang's MLA decode tiles; ptxas for sm_90, bf16: 192 registers, no spills, 56 KB of shared memory with V
        # a view of K, 89 KB with a separate V); fp32 caches halve the key block (75 / 108 KB).  128 query heads
        # (DeepSeek-V3 at TP1) run as 8 tiles; bench/gpu/mla.py times 32-head tiles against them.
        return _MIN_BLOCK_H, {1: 64, 2: 32}.get(elem_bytes, 16)
    block_n = 64 if block_d <= 128 else 32
    return max(_MIN_BLOCK_H, min(triton.next_power_of_2(group), 64)), (2 * block_n if elem_bytes == 1 else block_n)


def plan_decode_splits(batch_size: int, num_kv_heads: int, group: int, head_dim: int, head_dim_v: int,
                       elem_bytes: int, max_context: int, num_sms: int, max_splits: int) -> int:
    """The KV split count for a decode launch of ``batch_size`` requests, from values fixed when a CUDA graph is
    captured: enough (request, head tile, split) programs for ``TARGET_PROGRAMS_PER_SM`` per SM, no more splits
    than ``max_context`` fills with ``MLA_MIN_SPLIT_LEN``-key ranges, than ``max_splits`` (what the caller's
    scratch holds at this batch size) or than ``MAX_KV_SPLITS``; and never fewer than ``DEFAULT_KV_SPLITS`` (capped
    by ``max_splits``), so that batches which already fill the GPU keep their launch.

    The count is rounded down to a power of two.  V2-Lite (16 heads, 1 tile) on 132 SMs: batch 1 -> 128 splits
    at 32k context (256 keys each), 32 at 4k; batch 8 -> 32; 32 and up -> 8.  V3 at TP1 (128 heads, 8 tiles):
    batch 1 -> 32, 4 and up -> 8."""
    block_h, _ = decode_launch(group, head_dim, head_dim_v, elem_bytes)
    programs = batch_size * num_kv_heads * triton.cdiv(group, block_h)
    want = triton.cdiv(TARGET_PROGRAMS_PER_SM * num_sms, programs)
    by_context = triton.cdiv(max_context, MLA_MIN_SPLIT_LEN)
    # a power of two: on the H200 9 splits at batch 32 ran 1.6x slower than 8 (16k context, V2-Lite)
    splits = 1 << (min(want, by_context, MAX_KV_SPLITS).bit_length() - 1)
    return max(1, min(max(DEFAULT_KV_SPLITS, splits), max_splits))


def decode_attention_fwd(
    q: torch.Tensor,  # [bs, num_heads, Dk]
    k_buffer: torch.Tensor,  # [num_slots, num_kv_heads, Dk]
    v_buffer: torch.Tensor,  # [num_slots, num_kv_heads, Dv], Dv <= Dk; may be a view into k_buffer
    o: torch.Tensor,  # [bs, num_heads, Dv], written
    req_to_token: torch.Tensor,  # [max_reqs, max_context] int32
    req_pool_indices: torch.Tensor,  # [bs] int64
    seq_lens: torch.Tensor,  # [bs] int64
    mid_o: torch.Tensor,  # [>= bs, num_heads, num_kv_splits, Dv] fp32 scratch
    mid_lse: torch.Tensor,  # [>= bs, num_heads, num_kv_splits] fp32 scratch
    sm_scale: float,
    sliding_window: int | None = None,
    block_h: int | None = None,
    k_scale: torch.Tensor | None = None,  # [1] float32, an FP8 cache's: k = k_buffer * k_scale
    v_scale: torch.Tensor | None = None,  # [1] float32, an FP8 cache's: v = v_buffer * v_scale
    o_scale: torch.Tensor | None = None,  # [bs, num_heads * Dv / g] float32: o is E4M3 in groups of g, written
) -> None:
    """``o[i]`` = softmax(q[i] K^T * sm_scale) V over keys ``0 .. seq_lens[i]-1`` of request row
    ``req_pool_indices[i]`` (the last ``sliding_window`` of them when given), K/V read at the slots
    ``req_to_token[row, pos]``.  ``seq_lens[i] >= 1``: the new token's K/V is already stored.

    Keys (and queries) are ``Dk`` wide, values (and outputs) ``Dv <= Dk`` wide: DeepSeek MLA with absorbed
    weights is MQA over the latent cache ``k_buffer [num_slots, 1, 576]`` with ``v_buffer = k_buffer[..., :512]``.
    The number of KV splits is ``mid_o.shape[2]`` (``plan_decode_splits`` sizes it; at most ``MAX_KV_SPLITS``);
    an MLA-wide launch gives each non-empty split at least ``MLA_MIN_SPLIT_LEN`` keys.  ``block_h`` overrides
    the query-head tile of ``decode_launch`` (a power of two >= 16; for benchmarks).  q, o and the KV buffers
    need a unit stride in the last dimension (the KV buffers any strides in the first two); the KV buffers may be
    fp32, fp16 or bf16 (q is cast to their dtype), or FP8 with ``k_scale`` and ``v_scale`` (the buffers hold
    ``x / scale``; computed in fp16; MLA passes the latent's scale as both), o has q's dtype.
    """
    bs, num_heads, head_dim = q.shape
    num_kv_heads = k_buffer.shape[1]
    head_dim_v = v_buffer.shape[2]
    group = num_heads // num_kv_heads
    num_splits = mid_o.shape[2]
    assert q.stride(2) == 1 and o.stride(2) == 1 and num_heads == group * num_kv_heads
    assert k_buffer.stride(2) == 1 and v_buffer.stride(2) == 1
    assert k_buffer.shape[2] == head_dim and head_dim_v <= head_dim and v_buffer.shape[1] == num_kv_heads
    assert o.shape[2] == head_dim_v and mid_o.shape[3] == head_dim_v
    assert mid_o.shape[0] >= bs and mid_lse.shape[0] >= bs, "decode scratch is smaller than the batch"
    block_d, block_dpe, block_dv = head_blocks(head_dim, head_dim_v)
    fp8, _, precision = kv_compute(q, k_buffer, k_scale, v_scale)
    default_block_h, block_n = decode_launch(group, head_dim, head_dim_v, k_buffer.element_size())
    block_h = block_h or default_block_h
    mla_wide = head_dim != head_dim_v and block_d + block_dpe > 256
    # A wider MLA head tile takes twice the warps, so each thread holds as much of the accumulator as at 16 heads.
    num_warps = 8 if mla_wide and block_h > _MIN_BLOCK_H else 4
    min_split_len = MLA_MIN_SPLIT_LEN if mla_wide else block_n  # block_n: no floor beyond whole blocks
    grid = (bs, num_kv_heads * triton.cdiv(group, block_h), num_splits)
    _decode_split_kernel[grid](
        q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, mid_o, mid_lse, k_scale, v_scale,
        sm_scale * LOG2E, sliding_window or 0,
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        req_to_token.stride(0), mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0),
        mid_lse.stride(1),
        GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_D=block_d, BLOCK_DPE=block_dpe,
        BLOCK_DV=block_dv, V_FROM_K=v_is_k_prefix(k_buffer, v_buffer, block_d, block_dpe), BLOCK_H=block_h,
        BLOCK_N=block_n, NUM_SPLITS=num_splits, MIN_SPLIT_LEN=min_split_len, HAS_WINDOW=sliding_window is not None,
        KV_FP8=fp8, DOT_PRECISION=precision, num_warps=num_warps,
        num_stages=SPLIT_STAGES + 1 if fp8 and not mla_wide else SPLIT_STAGES, **pdl_launch_kwargs(q.device),
    )
    quant_group = 0
    if o_scale is not None:
        quant_group = num_heads * head_dim_v // o_scale.shape[1]
        assert o.dtype == FP8_DTYPE and quant_group_fits(head_dim_v, quant_group), "o_scale's groups"
        assert o_scale.shape == (bs, num_heads * head_dim_v // quant_group) and o_scale.stride(1) == 1
    _decode_merge_kernel[(bs, num_heads)](
        mid_o, mid_lse, o, o if o_scale is None else o_scale,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        o.stride(0), o.stride(1), 0 if o_scale is None else o_scale.stride(0), SCALE_EPS, FP8_MAX,
        HEAD_DIM=head_dim_v, BLOCK_D=block_dv, NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits),
        CHUNK_S=min(triton.next_power_of_2(num_splits), max(1, _MERGE_TILE // block_dv)),
        QUANT_GROUP=quant_group, OUT_DTYPE=TL_DTYPES[q.dtype], num_warps=4, **pdl_launch_kwargs(q.device),
    )


def quant_group_fits(head_dim_v: int, group: int | None) -> bool:
    """Whether stage 2 can quantize its output in groups of ``group`` channels: whole groups within a head of a
    power-of-two width (its tile)."""
    return group is not None and 0 < group <= head_dim_v and head_dim_v % group == 0 and \
        triton.next_power_of_2(head_dim_v) == head_dim_v and triton.next_power_of_2(group) == group
