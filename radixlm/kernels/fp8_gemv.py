"""FP8 linear layers at decode-sized M (a few tokens): one Triton kernel that quantizes the activations itself and
streams the FP8 weight once.

At M <= ``SMALL_M`` the layer is bound by reading the weight, and the two-kernel path of the large-M GEMMs
(quantize the activations, then a tensor-core FP8 GEMM whose tiles need 64 rows) spends its time on launches,
padding and too few programs.  Here one program owns ``BLOCK_N`` output columns for a tile of ``BLOCK_M`` rows and
walks K: it loads an activation tile, quantizes it to E4M3 exactly as ``fp8.per_token_group_quant_fp8`` would
(same scale, ``max(max|x|, SCALE_EPS) / 448``, IEEE division, round to nearest even), and multiplies the fp8
values, widened to fp16 (exact: E4M3 fits fp16's exponent range and significand), by the weight tile widened the
same way.  The products of two 4-bit significands are exact in the fp32 accumulator, so the result is the W8A8 sum
with fp32 accumulation throughout (Hopper's FP8 tensor cores accumulate with fewer bits).

Two weight formats (``fp8_linear``):

- block-wise ``[bn, bk]`` (``weight_scale_inv`` [ceil(N / bn), ceil(K / bk)]): activations per token per group of
  ``bk`` (K a multiple of ``bk``); a K tile is one group, so its scale is computed from the tile itself and the
  tile's dot is scaled by (activation group scale x weight block scale) before it joins the accumulator;
- per output channel (online FP8, ``weight_scale`` [N]): one activation scale per token over all of K, found by a
  first pass over the row; the unscaled dots accumulate and both scales multiply once at the end.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from radixlm.kernels.fp8 import FP8_MAX, SCALE_EPS, check_group_size
from radixlm.kernels.fp8_gemm import round_to_e4m3

# Rows at or below which ``fp8_linear`` runs this kernel on CUDA (one BLOCK_M tile).
SMALL_M = 16


class GemvConfig(NamedTuple):
    """Launch parameters; ``block_k`` is the per-channel K tile (block weights use their scale block's K)."""

    block_n: int
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 4


def default_gemv_config(n: int, k: int) -> GemvConfig:
    """Enough programs to keep every SM streaming (a 132-SM H200 wants >= ~2 per SM): narrow column tiles for
    narrow outputs.  Starting point for ``bench/gpu/fp8_gemm.py --tune-gemv``."""
    block_n = 64 if n >= 16384 else 32 if n >= 8192 else 16
    return GemvConfig(block_n, 256, 4, 4)


@triton.jit
def _quantize(x, scale, fp8_max):
    """``x`` [BLOCK_M, BLOCK_K] fp32 over its rows' ``scale`` [BLOCK_M] -> the E4M3 values in fp16 (exact: E4M3
    fits fp16's exponent range and significand), ready for an fp16 ``tl.dot`` whose products are then exact."""
    y = tl.clamp(tl.math.div_rn(x, scale[:, None]), -fp8_max, fp8_max)
    return round_to_e4m3(y).to(tl.float16)


@triton.jit
def _fp8_gemv_kernel(
    x_ptr, w_ptr, ws_ptr, out_ptr,
    m_dim, n_dim, k_dim, group_n,
    stride_xm, stride_wn, stride_om, stride_wsn,
    eps, fp8_max,
    PER_CHANNEL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < m_dim
    # Wrapped columns keep the weight loads in bounds without a mask; their results are not stored.
    offs_wn = (offs_n % n_dim).to(tl.int64)
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + offs_wn[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    if PER_CHANNEL:
        # One scale per token over the whole row: a first pass for max |x|.
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k in range(0, tl.cdiv(k_dim, BLOCK_K)):
            x_mask = m_ok[:, None] & (offs_k < k_dim - k * BLOCK_K)[None, :]
            x = tl.load(x_ptrs + k * BLOCK_K, mask=x_mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        x_scale = tl.math.div_rn(tl.maximum(amax, eps), fp8_max)  # [BLOCK_M]
        for k in range(0, tl.cdiv(k_dim, BLOCK_K)):
            k_ok = offs_k < k_dim - k * BLOCK_K
            x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
            acc = tl.dot(_quantize(x, x_scale, fp8_max), w.to(tl.float16), acc)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        w_scale = tl.load(ws_ptr + offs_wn * stride_wsn)  # [BLOCK_N]
        acc = acc * x_scale[:, None] * w_scale[None, :]
    else:
        # BLOCK_K is the scale block's K: every tile is one activation group and one weight-scale column.
        ws_ptrs = ws_ptr + (offs_wn // group_n) * stride_wsn  # [BLOCK_N]
        for k in range(0, k_dim // BLOCK_K):
            x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0).to(tl.float32)
            w = tl.load(w_ptrs)
            x_scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=1), eps), fp8_max)  # [BLOCK_M]
            part = tl.dot(_quantize(x, x_scale, fp8_max), w.to(tl.float16))
            acc += part * x_scale[:, None] * tl.load(ws_ptrs + k)[None, :]
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K

    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & (offs_n < n_dim)[None, :])


def fp8_gemv(
    x: torch.Tensor,  # [M, K] bf16/fp16/fp32, unit stride along K
    weight: torch.Tensor,  # [N, K] float8_e4m3fn
    weight_scale: torch.Tensor,  # [N] float32 (per channel) or [ceil(N / bn), ceil(K / bk)] (block)
    block_size: tuple[int, int] | None = None,  # (bn, bk) of a block weight; None: per channel
    out_dtype: torch.dtype | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:  # [M, N], x's dtype unless out_dtype
    """``x @ W^T`` with ``x`` quantized per token (per group of ``bk`` for block weights) inside the kernel.  Any
    M works (a grid row per 16 rows, each re-reading the weight): the layer sends only M <= ``SMALL_M`` here on
    the fast path, and fp32 models' rows of any M, which cuBLAS's bf16-output FP8 GEMM would round."""
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"FP8 GEMV: x has K={k}, the weight {tuple(weight.shape)}")
    if config is None:
        config = default_gemv_config(n, k)
    if block_size is None:
        if weight_scale.shape != (n,):
            raise ValueError(f"per-channel FP8 weight of {n} rows needs {n} scales, got {tuple(weight_scale.shape)}")
        group_n, block_k, stride_wsn = 1, config.block_k, weight_scale.stride(0)
    else:
        bn, bk = block_size
        check_group_size(k, bk)
        if weight_scale.shape != (triton.cdiv(n, bn), k // bk):
            raise ValueError(f"block FP8 weight {tuple(weight.shape)} with blocks {block_size} needs scales "
                             f"{(triton.cdiv(n, bn), k // bk)}, got {tuple(weight_scale.shape)}")
        weight_scale = weight_scale.contiguous()
        group_n, block_k, stride_wsn = bn, bk, weight_scale.stride(0)
    if x.stride(1) != 1:
        x = x.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    out = torch.empty((m, n), dtype=out_dtype or x.dtype, device=x.device)
    if m == 0:
        return out
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, SMALL_M))
    _fp8_gemv_kernel[grid](
        x, weight, weight_scale, out, m, n, k, group_n,
        x.stride(0), weight.stride(0), out.stride(0), stride_wsn, SCALE_EPS, FP8_MAX,
        PER_CHANNEL=block_size is None, BLOCK_M=SMALL_M, BLOCK_N=config.block_n, BLOCK_K=block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
