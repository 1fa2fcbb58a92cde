"""FP8 GEMMs at decode-sized M (a few tokens): a Triton kernel that streams the FP8 weight once.

At M <= ``SMALL_M`` a linear layer is bound by reading its weight.  The tensor-core FP8 GEMM's tiles need 64
rows (``fp8_gemm``; most of a decode tile would be padding) and cuBLAS's FP8 GEMM is tuned for large M, so here
each program owns ``BLOCK_N`` output columns of a 16-row tile and walks its share of K (all of it, or a
``1 / SPLIT_K`` slice whose partial sums are added atomically in fp32), loading the pre-quantized activations
(``fp8_gemm``'s quantizers) and the weight, both widened to fp16 for the dot: exact, as E4M3 fits fp16's exponent
range and significand, and the products of two 4-bit significands are exact in the fp32 accumulator, so the
result is the W8A8 sum with fp32 accumulation throughout (Hopper's FP8 tensor cores accumulate with fewer bits).

Two weight formats (``fp8_linear``):

- block-wise ``[bn, bk]`` (``weight_scale_inv`` [ceil(N / bn), K / bk]), activations per token per group of
  ``bk``: a K tile is one scale slice, so the tile's dot is scaled by (activation group scale x weight block
  scale) before it joins the accumulator;
- per output channel (online FP8, ``weight_scale`` [N]), activations per token: the unscaled dots accumulate and
  both scales multiply once at the end.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

# Rows at or below which the FP8 linears run this kernel on CUDA (one BLOCK_M tile).
SMALL_M = 16


class GemvConfig(NamedTuple):
    """Launch parameters; ``block_k`` is the per-channel K tile (block weights use their scale block's K);
    ``split_k`` > 1 divides K over that many programs per column tile (fp32 atomics, then a cast)."""

    block_n: int
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 4
    split_k: int = 1


def default_gemv_config(n: int, k: int) -> GemvConfig:
    """From ``bench/gpu/fp8_gemm.py --tune-gemv`` on an H200 (GPU run G2, Llama-3.1-8B and DeepSeek-V3 shapes,
    M 1 and 16): 256-wide K tiles, 4 warps and 5 stages were within ~10 % of each shape's best; 64-column tiles
    for wide outputs, 32 for narrow ones (more programs; N = 4096 gives 128).  Split K lost to its extra zero
    fill and cast except on Llama's down projection at M = 1 (per channel, 30 against 40 us)."""
    return GemvConfig(64 if n >= 6144 else 32, 256, 4, 5)


@triton.jit
def _fp8_gemv_kernel(
    xq_ptr, xs_ptr, w_ptr, ws_ptr, out_ptr,
    m_dim, n_dim, k_dim, group_n, group_k,
    stride_xm, stride_xsm, stride_wn, stride_wsn, stride_om,
    PER_CHANNEL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < m_dim
    rows = offs_m.to(tl.int64)
    # Wrapped columns keep the weight loads in bounds without a mask; their results are not stored.
    offs_wn = (offs_n % n_dim).to(tl.int64)
    k_per_split = tl.cdiv(tl.cdiv(k_dim, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = tl.program_id(2) * k_per_split
    k_end = tl.minimum(k_start + k_per_split, k_dim)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        k_ok = offs_k < k_dim - k
        x = tl.load(xq_ptr + rows[:, None] * stride_xm + k + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)  # [BLOCK_M, BLOCK_K] fp8
        w = tl.load(w_ptr + offs_wn[None, :] * stride_wn + k + offs_k[:, None], mask=k_ok[:, None],
                    other=0.0)  # [BLOCK_K, BLOCK_N] fp8
        if PER_CHANNEL:
            acc = tl.dot(x.to(tl.float16), w.to(tl.float16), acc)
        else:
            k_slice = k // group_k
            x_s = tl.load(xs_ptr + rows * stride_xsm + k_slice, mask=m_ok, other=0.0)  # [BLOCK_M]
            w_s = tl.load(ws_ptr + (offs_wn // group_n) * stride_wsn + k_slice)  # [BLOCK_N]
            acc += tl.dot(x.to(tl.float16), w.to(tl.float16)) * x_s[:, None] * w_s[None, :]
    if PER_CHANNEL:
        x_s = tl.load(xs_ptr + rows * stride_xsm, mask=m_ok, other=0.0)
        acc = acc * x_s[:, None] * tl.load(ws_ptr + offs_wn * stride_wsn)[None, :]

    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :]
    out_mask = m_ok[:, None] & (offs_n < n_dim)[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)


def fp8_gemv(
    x_q: torch.Tensor,  # [M, K] float8_e4m3fn, unit stride along K
    x_s: torch.Tensor,  # [M, 1] float32 (per channel) or [M, K / bk] (block)
    weight: torch.Tensor,  # [N, K] float8_e4m3fn
    weight_scale: torch.Tensor,  # [N] float32 (per channel) or [ceil(N / bn), K / bk] (block)
    block_size: tuple[int, int] | None = None,  # (bn, bk) of a block weight; None: per channel
    out_dtype: torch.dtype = torch.bfloat16,
    config: GemvConfig | None = None,
) -> torch.Tensor:  # [M, N] out_dtype
    """``(x_q * x_s) @ (weight * weight_scale)^T`` with fp32 accumulation.  Any M works (a grid row per 16
    rows, each re-reading the weight): the FP8 linears send M <= ``SMALL_M`` here, and float32 models' rows of
    any M (cuBLAS's row-wise FP8 GEMM writes bf16 only)."""
    m, k = x_q.shape
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"FP8 GEMV: x has K={k}, the weight {tuple(weight.shape)}")
    if config is None:
        config = default_gemv_config(n, k)
    if block_size is None:
        if weight_scale.shape != (n,) or x_s.shape != (m, 1):
            raise ValueError(f"per-channel FP8 GEMV of {m} x {k} by {n} x {k} needs scales ({m}, 1) and ({n},), "
                             f"got {tuple(x_s.shape)} and {tuple(weight_scale.shape)}")
        group_n, group_k, block_k = 1, k, config.block_k
    else:
        bn, bk = block_size
        if k % bk or weight_scale.shape != (triton.cdiv(n, bn), k // bk) or x_s.shape != (m, k // bk):
            raise ValueError(f"block FP8 GEMV of {m} x {k} by {tuple(weight.shape)} with blocks {block_size} needs "
                             f"K a multiple of {bk} and scales ({m}, {k // bk}) and {(triton.cdiv(n, bn), k // bk)}, "
                             f"got {tuple(x_s.shape)} and {tuple(weight_scale.shape)}")
        group_n, group_k, block_k = bn, bk, bk
    if x_q.stride(1) != 1:
        x_q = x_q.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    weight_scale = weight_scale.contiguous()
    split_k = config.split_k
    out = torch.empty((m, n), dtype=out_dtype, device=x_q.device) if split_k == 1 else \
        torch.zeros((m, n), dtype=torch.float32, device=x_q.device)
    if m == 0:
        return out.to(out_dtype)
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, SMALL_M), split_k)
    _fp8_gemv_kernel[grid](
        x_q, x_s, weight, weight_scale, out, m, n, k, group_n, group_k,
        x_q.stride(0), x_s.stride(0), weight.stride(0), weight_scale.stride(0), out.stride(0),
        PER_CHANNEL=block_size is None, BLOCK_M=SMALL_M, BLOCK_N=config.block_n, BLOCK_K=block_k,
        SPLIT_K=split_k, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out if split_k == 1 else out.to(out_dtype)
