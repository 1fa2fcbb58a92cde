"""Triton kernels for the memory-bound ops between the GEMMs: RMSNorm (optionally fused with the residual add),
SiLU-and-mul, and NeoX rotary embedding.

Each replaces a sequence of eager torch ops, every one of which reads and writes the whole activation, by a
single pass over memory.  They follow the rounding order of the torch implementations in ``radixlm.layers``
(see each function for how close the results are) and return new tensors rather than writing in place, so the
layers' semantics do not depend on the device.  Importing this module compiles nothing; kernels are compiled
on first launch for each dtype/shape specialisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixlm.kernels import as_rows
from radixlm.kernels.kv_store import KVStore, cache_value, store_row
from radixlm.kernels.pdl import pdl_launch_kwargs, pdl_trigger, pdl_wait

# Rows of a norm are reduced by one program, so the whole row must fit in one block.
MAX_NORM_HIDDEN = 16384
# Elements of q/k one rotary program holds per tile ([heads, rotary_dim / 2], for each of the two halves).
_ROTARY_TILE = 2048
_SILU_BLOCK = 1024
_V_BLOCK = 1024  # V values the rotary kernel stores per iteration


def _new_output(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous tensor of ``like``'s shape and device; ``empty_like`` costs about half of ``empty`` on
    the host, which matters at decode sizes, where these kernels are launch-bound."""
    return torch.empty_like(like, dtype=dtype, memory_format=torch.contiguous_format)


@triton.jit
def norm_input(x_ptr, residual_ptr, new_residual_ptr, row, x_row_stride, residual_row_stride, cols, mask,
               HAS_RESIDUAL: tl.constexpr):
    """Columns ``cols`` of the row a norm normalises: ``x``'s, or ``x + residual`` rounded to the new residual's
    dtype (not stored here)."""
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * residual_row_stride + cols, mask=mask, other=0.0)
        # Rounded to the storage dtype before the statistics, exactly as torch's ``x + residual`` is.
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(new_residual_ptr.dtype.element_ty)
    return x


@triton.jit
def inv_rms(x, n_cols, eps):
    """``rsqrt(mean(x^2) + eps)`` in fp32 of a whole row ``x`` (masked lanes zero)."""
    h = x.to(tl.float32)
    return tl.rsqrt(tl.sum(h * h, axis=0) / n_cols + eps)


@triton.jit
def rms_apply(x, inv, weight):
    """``weight * (x * inv).to(x.dtype)`` in fp32: the normalised row is cast back to the input dtype before the
    weight multiplies it (HF's order)."""
    return weight.to(tl.float32) * (x.to(tl.float32) * inv).to(x.dtype).to(tl.float32)


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, new_residual_ptr,
    x_row_stride, residual_row_stride, n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    pdl_trigger(PDL)
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = norm_input(x_ptr, residual_ptr, new_residual_ptr, row, x_row_stride, residual_row_stride, cols, mask,
                   HAS_RESIDUAL)
    if HAS_RESIDUAL:
        tl.store(new_residual_ptr + row * n_cols + cols, x, mask=mask)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    out = rms_apply(x, inv_rms(x, n_cols, eps), weight)
    tl.store(out_ptr + row * n_cols + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def norm_num_warps(block: int) -> int:
    """Warps of a norm program over a ``block``-wide row; the fused-quantization norm uses the same, so its sum of
    squares is reduced in the same order (the same bits)."""
    return min(max(block // 512, 1), 16)


def norm_operands(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.dtype]:
    """A norm launch's checked operands: (``x`` as rows [rows, hidden], ``residual`` as rows or None, the new
    residual's output tensor or None, the normalised output's dtype).  ValueError for a hidden size past
    ``MAX_NORM_HIDDEN`` or shapes that disagree."""
    hidden = x.shape[-1]
    if hidden > MAX_NORM_HIDDEN:
        raise ValueError(f"rms_norm supports hidden sizes up to {MAX_NORM_HIDDEN}, got {hidden}")
    if weight.shape != (hidden,):
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match hidden size {hidden}")
    x2d = as_rows(x)  # [rows, hidden]
    if residual is None:
        return x2d, None, None, torch.promote_types(weight.dtype, x.dtype)
    if residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} differs from x shape {tuple(x.shape)}")
    norm_dtype = torch.promote_types(x.dtype, residual.dtype)
    # torch promotes ``weight * normed``: an fp32 weight over bf16 activations gives an fp32 output.
    return x2d, as_rows(residual), _new_output(x, norm_dtype), torch.promote_types(weight.dtype, norm_dtype)


def _launch_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden = x.shape[-1]
    x2d, residual2d, new_residual, out_dtype = norm_operands(x, residual, weight)
    out = _new_output(x, out_dtype)
    if x2d.shape[0] == 0:
        return out, new_residual
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(x2d.shape[0],)](
        x2d, residual2d, weight, out, new_residual,
        x2d.stride(0), 0 if residual2d is None else residual2d.stride(0), hidden, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=norm_num_warps(block),
        **pdl_launch_kwargs(x.device),
    )
    return out, new_residual


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (h * rsqrt(mean(h^2) + eps)).to(x.dtype)`` over the last dim, ``h = x.float()``.

    ``x`` [..., hidden] with hidden <= ``MAX_NORM_HIDDEN``, ``weight`` [hidden].  Returns a new contiguous tensor
    of ``x``'s shape in the dtype torch would promote ``weight * x`` to.  Matches ``RMSNorm.forward_native`` up to
    the order of the fp32 sum of squares and the rsqrt approximation, i.e. at most about one ulp of the output
    dtype.
    """
    return _launch_rms_norm(x, None, weight, eps)[0]


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)`` in one pass; neither input is modified.

    ``x`` and ``residual`` [..., hidden] of the same shape.  The new residual is bit-identical to torch's
    ``x + residual`` (computed in fp32, rounded once to the promoted dtype); the normalised output is as close
    as ``rms_norm``'s.
    """
    return _launch_rms_norm(x, residual, weight, eps)


@triton.jit
def silu_mul(gate, up):
    """``silu(gate) * up`` in fp32 of loaded gate and up values."""
    gate = gate.to(tl.float32)
    return gate * tl.sigmoid(gate) * up.to(tl.float32)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_row_stride, d, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_trigger(PDL)
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * x_row_stride + d + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * d + cols, silu_mul(gate, up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``x`` [..., 2 * d] = gate ‖ up; returns a new contiguous [..., d] in x's dtype.

    Computed in fp32 and rounded once, where eager torch rounds ``silu(gate)`` to x's dtype before the
    product: for fp16/bf16 the two differ by up to about one ulp of x's dtype; for fp32 by fp32 rounding only.
    """
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even last dim, got {x.shape[-1]}")
    d = x.shape[-1] // 2
    x2d = as_rows(x)  # [rows, 2 * d]
    out = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    if x2d.shape[0] and d:
        # Rows on grid axis 0, which (unlike axes 1 and 2) is not limited to 65535 blocks.
        grid = (x2d.shape[0], triton.cdiv(d, _SILU_BLOCK))
        _silu_and_mul_kernel[grid](x2d, out, x2d.stride(0), d, BLOCK=_SILU_BLOCK, num_warps=4,
                                   **pdl_launch_kwargs(x.device))
    return out


@triton.jit
def _rotate_heads(
    x_ptr, dst_ptr, token, x_token_stride, x_head_stride, num_heads, cos, sin, scale_ptr, fp8_max,
    HEAD_DIM: tl.constexpr, ROTARY_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr, QUANT: tl.constexpr, E4M3: tl.constexpr,
):
    """Rotate every head of one token of ``x`` into ``dst_ptr``, the token's contiguous [num_heads, HEAD_DIM]
    row (an output row, or a KV cache slot: then the values, rounded to x's dtype, are stored as
    ``kv_store.store_kv`` stores them); ``cos``/``sin`` are the token's [BLOCK_HALF] fp32 angles."""
    dtype = x_ptr.dtype.element_ty
    out_dtype = dst_ptr.dtype.element_ty
    half: tl.constexpr = ROTARY_DIM // 2
    # The torch path casts the fp32 cache to x's dtype and rounds each product and the sum to it; doing the
    # same here (with fp fusion off at launch, so no FMA merges a product into the sum) gives identical bits.
    cos = cos.to(dtype).to(tl.float32)[None, :]
    sin = sin.to(dtype).to(tl.float32)[None, :]
    dims = tl.arange(0, BLOCK_HALF)
    for head_start in range(0, num_heads, BLOCK_H):
        heads = head_start + tl.arange(0, BLOCK_H)
        head_mask = (heads < num_heads)[:, None]
        mask = head_mask & (dims < half)[None, :]
        src = x_ptr + token * x_token_stride + heads[:, None] * x_head_stride  # [BLOCK_H, 1]
        dst = dst_ptr + heads[:, None] * HEAD_DIM  # [BLOCK_H, 1]
        x1 = tl.load(src + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + half + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        out1 = ((x1 * cos).to(dtype).to(tl.float32) - (x2 * sin).to(dtype).to(tl.float32)).to(dtype)
        out2 = ((x2 * cos).to(dtype).to(tl.float32) + (x1 * sin).to(dtype).to(tl.float32)).to(dtype)
        tl.store(dst + dims[None, :], cache_value(out1, scale_ptr, fp8_max, QUANT, E4M3).to(out_dtype), mask=mask)
        tl.store(dst + half + dims[None, :], cache_value(out2, scale_ptr, fp8_max, QUANT, E4M3).to(out_dtype),
                 mask=mask)
        if ROTARY_DIM < HEAD_DIM:
            rest = ROTARY_DIM + tl.arange(0, BLOCK_PASS)
            rest_mask = head_mask & (rest < HEAD_DIM)[None, :]
            passed = tl.load(src + rest[None, :], mask=rest_mask)
            tl.store(dst + rest[None, :], cache_value(passed, scale_ptr, fp8_max, QUANT, E4M3).to(out_dtype),
                     mask=rest_mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, v_ptr, q_out_ptr, k_out_ptr, v_buf_ptr, positions_ptr, cos_sin_ptr, loc_ptr, k_scale_ptr,
    v_scale_ptr, q_token_stride, q_head_stride, k_token_stride, k_head_stride, v_token_stride, cos_sin_stride,
    num_heads, num_kv_heads, v_width, fp8_max,
    HEAD_DIM: tl.constexpr, ROTARY_DIM: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr, BLOCK_V: tl.constexpr, STORE: tl.constexpr,
    QUANT: tl.constexpr, E4M3: tl.constexpr, PDL: tl.constexpr,
):
    # Program (token, part): part 0 rotates the token's q heads, part 1 its k heads, into k_out's row or (STORE)
    # into the token's cache slot of k_out (the K buffer); with STORE, part 2 stores its V row in V's slot.
    pdl_trigger(PDL)
    pdl_wait(PDL)
    token = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    if STORE:
        slot = tl.load(loc_ptr + token).to(tl.int64)
    else:
        slot = token
    if part == 2:
        store_row(v_ptr, v_buf_ptr, v_scale_ptr, token, slot, v_width, v_token_stride, fp8_max, QUANT, E4M3,
                  BLOCK_V)
    else:
        position = tl.load(positions_ptr + token).to(tl.int64)
        dims = tl.arange(0, BLOCK_HALF)
        dim_mask = dims < ROTARY_DIM // 2
        cos = tl.load(cos_sin_ptr + position * cos_sin_stride + dims, mask=dim_mask, other=0.0)
        sin = tl.load(cos_sin_ptr + position * cos_sin_stride + ROTARY_DIM // 2 + dims, mask=dim_mask, other=0.0)
        if part == 0:
            _rotate_heads(q_ptr, q_out_ptr + token * num_heads * HEAD_DIM, token, q_token_stride, q_head_stride,
                          num_heads, cos, sin, k_scale_ptr, fp8_max, HEAD_DIM, ROTARY_DIM, BLOCK_HQ, BLOCK_HALF,
                          BLOCK_PASS, False, E4M3)
        else:
            _rotate_heads(k_ptr, k_out_ptr + slot * num_kv_heads * HEAD_DIM, token, k_token_stride, k_head_stride,
                          num_kv_heads, cos, sin, k_scale_ptr, fp8_max, HEAD_DIM, ROTARY_DIM, BLOCK_HK,
                          BLOCK_HALF, BLOCK_PASS, QUANT, E4M3)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, rotary_dim: int,
    v: torch.Tensor | None = None, kv_out: KVStore | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """NeoX rotary embedding of ``q`` [num_tokens, num_heads, head_dim] and ``k`` [num_tokens, num_kv_heads,
    head_dim] at ``positions`` [num_tokens] (any order, int32 or int64).

    ``cos_sin_cache`` [max_position, rotary_dim] fp32 holds the cos of each frequency then its sin; the first
    ``rotary_dim`` dims of each head are rotated and the rest pass through.  ``q``/``k`` may be strided views
    (e.g. slices of a fused qkv output) whose last dim is contiguous.  Returns new contiguous tensors, the same
    bits as ``RotaryEmbedding.forward_native`` (same casts and roundings, fp fusion disabled).

    With ``kv_out`` (and ``v`` [num_tokens, num_kv_heads, v_head_dim]) the same launch stores the rotated K and
    ``v`` at the slots ``kv_out.loc`` instead of returning K (None in its place): the bytes
    ``kv_store.store_kv`` would store from the returned K, without K's round trip through memory and the store's
    launch.  Programs: one per token for its q heads, one for its k heads, and one for its V row.
    """
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim or rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
        raise ValueError(f"bad rotary dims: q {tuple(q.shape)}, k {tuple(k.shape)}, rotary_dim {rotary_dim}")
    if cos_sin_cache.shape[-1] != rotary_dim or cos_sin_cache.stride(-1) != 1:
        raise ValueError(f"cos_sin_cache {tuple(cos_sin_cache.shape)} is not a contiguous [*, {rotary_dim}]")
    num_tokens, num_heads, num_kv_heads = q.shape[0], q.shape[1], k.shape[1]
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    q_out = _new_output(q, q.dtype)
    if kv_out is None:
        k_out, v_rows, v_width, parts = _new_output(k, k.dtype), q, 0, 2  # v_rows not read
        k_scale = v_scale = loc = v_buf = q  # not read
    else:
        k_out, v_buf, loc = kv_out.k_buf, kv_out.v_buf, kv_out.loc
        _check_kv_out(kv_out, v, num_tokens, num_kv_heads, head_dim)
        v_width = v_buf.shape[1] * v_buf.shape[2]
        v_rows, parts = v.reshape(num_tokens, v_width), 3
        v_rows = v_rows if v_rows.stride(-1) == 1 else v_rows.contiguous()
        k_scale, v_scale = (kv_out.k_scale, kv_out.v_scale) if kv_out.quantized else (k_out, k_out)
    if num_tokens == 0:
        return q_out, None if kv_out is not None else k_out
    block_half = triton.next_power_of_2(rotary_dim // 2)
    max_heads = max(1, _ROTARY_TILE // block_half)
    quant = kv_out is not None and kv_out.quantized
    _rotary_kernel[(num_tokens, parts)](
        q, k, v_rows, q_out, k_out, v_buf, positions, cos_sin_cache, loc, k_scale, v_scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v_rows.stride(0), cos_sin_cache.stride(0),
        num_heads, num_kv_heads, v_width, torch.finfo(k_out.dtype).max if quant else 0.0,
        HEAD_DIM=head_dim, ROTARY_DIM=rotary_dim,
        BLOCK_HQ=min(triton.next_power_of_2(num_heads), max_heads),
        BLOCK_HK=min(triton.next_power_of_2(num_kv_heads), max_heads),
        BLOCK_HALF=block_half, BLOCK_PASS=triton.next_power_of_2(max(head_dim - rotary_dim, 1)),
        BLOCK_V=min(_V_BLOCK, triton.next_power_of_2(max(v_width, 1))), STORE=kv_out is not None,
        QUANT=quant, E4M3=k_out.dtype == torch.float8_e4m3fn,
        num_warps=4, enable_fp_fusion=False, **pdl_launch_kwargs(q.device),
    )
    return q_out, None if kv_out is not None else k_out


def _check_kv_out(kv_out: KVStore, v: torch.Tensor | None, num_tokens: int, num_kv_heads: int,
                  head_dim: int) -> None:
    k_buf, v_buf = kv_out.k_buf, kv_out.v_buf
    if v is None or v.shape[:2] != (num_tokens, num_kv_heads) or v.stride(-1) != 1:
        raise ValueError(f"storing K/V needs v [{num_tokens}, {num_kv_heads}, v_head_dim] with a unit last "
                         f"stride, got {None if v is None else tuple(v.shape)}")
    if (not k_buf.is_contiguous() or not v_buf.is_contiguous() or k_buf.dtype != v_buf.dtype
            or k_buf.shape[1:] != (num_kv_heads, head_dim) or v_buf.shape[1:] != v.shape[1:]
            or kv_out.loc.shape != (num_tokens,)):
        raise ValueError(f"K/V buffers {tuple(k_buf.shape)} / {tuple(v_buf.shape)} ({k_buf.dtype} / {v_buf.dtype}, "
                         f"contiguous and of one dtype) and slots {tuple(kv_out.loc.shape)} do not fit "
                         f"{num_tokens} tokens of {num_kv_heads} heads x {head_dim} / {v.shape[-1]}")
    if kv_out.quantized and (kv_out.k_scale is None or kv_out.v_scale is None):
        raise ValueError("an FP8 cache's store needs its scales")
