"""The Triton kernel of ``radixlm.kernels.fp8_bmm`` (see there for the format).

Grid: (batch index b, M tile x N tile).  A program loads its ``[BLOCK_M, BLOCK_K]`` tiles of x in x's dtype,
multiplies by the inverse of the per-tensor scale and casts to E4M3 in registers (the quantization is fused: no
fp8 copy of x is written, no extra launch), and multiplies with the ``[BLOCK_K, BLOCK_N]`` tile of ``w[b]``
(K-contiguous, as sm_90's fp8 wgmma wants both operands).  Every N tile of a row block requantizes its x tiles,
so that work is kept to a multiply, a clamp and the cast (a division per element, or the arithmetic rounding
below, could make the decode-sized kernel ALU-bound, as quantizing inside every program made ``fp8_gemv``).  On
CPU tensors (Triton's interpreter, whose fp8 casts misround) the value is first rounded in arithmetic
(``fp8_gemm.round_to_e4m3``), so the interpreter gives the GPU's fp8 values.

Each K tile's dot starts from zero and is added to the fp32 accumulator: on sm_90 an fp8 dot accumulates with
reduced precision, and this bounds the imprecise sums to one tile (<= 128 products), as the block-FP8 GEMM does.
The two scales multiply the accumulator once, at the end.  Rows past M and columns past N wrap (in-bounds loads,
not stored); K past the end is masked to zero.  An fp8 ``tl.dot`` needs ``BLOCK_K >= 32`` on a GPU; smaller K is
padded by the mask.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixlm.kernels.fp8 import FP8_DTYPE, FP8_MAX, SCALE_EPS
from radixlm.kernels.fp8_gemm import round_to_e4m3
from radixlm.kernels.gemm_config import GemmConfig


def default_bmm_config(m: int, n: int, k: int) -> GemmConfig:
    """Block sizes by M (tokens).  Decode-sized M streams the weights once: the smallest M tile, 64-wide N tiles
    for programs enough to fill the SMs (128 heads x 512 / 64 for W_UK).  A starting point for the H200 sweep
    (``bench/gpu/mla.py --parts d``), not yet tuned.  ``group_m`` is unused (one head per grid row)."""
    block_k = max(32, min(128, triton.next_power_of_2(k)))
    if m <= 16:
        return GemmConfig(16, 64, block_k, num_warps=4, num_stages=4)
    if m <= 64:
        return GemmConfig(64, 64, block_k, num_warps=4, num_stages=4)
    return GemmConfig(64, 128, block_k, num_warps=4, num_stages=3)


@triton.jit
def _fp8_bmm_kernel(
    x_ptr, x_amax_ptr, w_ptr, w_scale_ptr, out_ptr,
    m_dim, n_dim, k_dim,
    stride_xm, stride_xb, stride_wb, stride_wn, stride_om, stride_ob,
    eps, fp8_max,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    ROUND_IN_ARITHMETIC: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    num_blocks_n = tl.cdiv(n_dim, BLOCK_N)
    pid_m = tl.program_id(1) // num_blocks_n
    pid_n = tl.program_id(1) % num_blocks_n
    # IEEE divisions, as torch's: Triton's default fp32 division is approximate.
    x_scale = tl.math.div_rn(tl.maximum(tl.load(x_amax_ptr).to(tl.float32), eps), fp8_max)
    x_inv_scale = tl.math.div_rn(1.0, x_scale)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_xm = (offs_m % m_dim).to(tl.int64)
    offs_wn = (offs_n % n_dim).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + b * stride_xb + offs_xm[:, None] * stride_xm + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + b * stride_wb + offs_wn[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(k_dim, BLOCK_K)):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_ok = offs_k < k_dim - k * BLOCK_K
            x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        y = tl.clamp(x.to(tl.float32) * x_inv_scale, -fp8_max, fp8_max)
        if ROUND_IN_ARITHMETIC:
            y = round_to_e4m3(y)
        acc += tl.dot(y.to(w_ptr.dtype.element_ty), w)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    acc = acc * (x_scale * tl.load(w_scale_ptr + b))
    out_ptrs = out_ptr + b * stride_ob + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty),
             mask=(offs_m < m_dim)[:, None] & (offs_n < n_dim)[None, :])


def fp8_bmm_triton(
    x: torch.Tensor,  # [M, B, K] float, unit stride along K
    x_amax: torch.Tensor,  # [1]: max |x| (``fp8_bmm.activation_amax``)
    w_q: torch.Tensor,  # [B, N, K] float8_e4m3fn, unit stride along K
    w_s: torch.Tensor,  # [B] float32
    out_dtype: torch.dtype,
    config: GemmConfig | None = None,
) -> torch.Tensor:  # [M, B, N] out_dtype
    """``fp8_bmm.fp8_bmm`` on any device Triton runs on; ``config`` overrides ``default_bmm_config``."""
    m, batch, k = x.shape
    n = w_q.shape[1]
    if w_q.dtype != FP8_DTYPE or w_q.shape != (batch, n, k) or w_s.shape != (batch,):
        raise ValueError(f"FP8 bmm shapes disagree: x {tuple(x.shape)}, w {tuple(w_q.shape)} {w_q.dtype}, "
                         f"w_s {tuple(w_s.shape)}")
    if x.stride(2) != 1:
        x = x.contiguous()
    if w_q.stride(2) != 1:
        w_q = w_q.contiguous()
    config = config or default_bmm_config(m, n, k)
    out = torch.empty((m, batch, n), dtype=out_dtype, device=x.device)
    if m == 0:
        return out
    grid = (batch, triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n))
    _fp8_bmm_kernel[grid](
        x, x_amax, w_q, w_s, out, m, n, k,
        x.stride(0), x.stride(1), w_q.stride(0), w_q.stride(1), out.stride(0), out.stride(1),
        SCALE_EPS, FP8_MAX,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, EVEN_K=k % config.block_k == 0,
        ROUND_IN_ARITHMETIC=not x.is_cuda, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
