"""The Triton kernels of ``radixlm.kernels.fp8``: per-token-group activation quantization and the block-scaled
FP8 GEMM (see ``fp8`` for the format).

The GEMM computes one ``[BLOCK_M, BLOCK_N]`` tile per program.  ``BLOCK_K`` divides the scale block ``bk``, so
every K tile lies in one scale slice ``j``: the tile's fp8 ``tl.dot`` (fp32 result) is multiplied by
``a_s[rows, j] * b_s[cols // bn, j]`` and added to the fp32 accumulator.  The column scales are loaded per
column, so ``BLOCK_N`` need not match ``bn``.  Each tile's dot starts from zero and is added to the accumulator in
fp32: on sm_90, where an fp8 wgmma accumulates with reduced precision (Triton's default there), that limits the
imprecise sums to one K tile (<= 128 products), the promotion interval DeepSeek-V3 uses.  N and K need not be multiples of the blocks: columns past N wrap
(in-bounds loads, not stored) and K past the end is masked to zero.  Block sizes come from
``default_fp8_config`` (decode-sized M vs prefill); a tuning sweep passes its own ``GemmConfig``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixlm.kernels.gemm_config import GemmConfig

from radixlm.kernels.fp8 import FP8_DTYPE, FP8_MAX, SCALE_EPS, check_group_size
from radixlm.kernels.pdl import pdl_launch_kwargs, pdl_trigger, pdl_wait


# Elements one quantization program holds: several groups of a row, so a program has enough work on a GPU (and
# the interpreter runs few programs).
_QUANT_TILE = 2048


@triton.jit
def round_to_e4m3(y):
    """``y`` (fp32, |y| <= 448) rounded to the nearest E4M3 value (ties to even), still in fp32.  Done in integer
    and float arithmetic rather than by a cast so Triton's CPU interpreter, whose fp8 casts misround, gives the
    GPU's result.  Normal range: round the fp32 significand to 3 bits (a carry into the exponent is the correct
    next binade).  Below 2^-6, E4M3's subnormals are multiples of 2^-9: adding and subtracting 1.5 * 2^14, whose
    fp32 ulp is 2^-9, rounds there (a tiny negative gives +0 where torch's cast gives -0: the same value)."""
    bits = y.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
    subnormal = (y + 24576.0) - 24576.0
    return tl.where(tl.abs(y) < 0.015625, subnormal, normal)


@triton.jit
def round_to_e5m2(y):
    """``round_to_e4m3`` for E5M2 (|y| <= 57344): 2 significand bits; subnormals below 2^-14 are multiples of
    2^-16, the fp32 ulp of 1.5 * 2^7."""
    bits = y.to(tl.int32, bitcast=True)
    normal = ((bits + 0xFFFFF + ((bits >> 21) & 1)) & -0x200000).to(tl.float32, bitcast=True)
    subnormal = (y + 192.0) - 192.0
    return tl.where(tl.abs(y) < 6.103515625e-05, subnormal, normal)


@triton.jit
def _group_quant_kernel(
    x_ptr, q_ptr, s_ptr, group_size, x_row_stride, num_groups, eps, fp8_max,
    GROUPS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    # Program (row, chunk) quantizes groups [chunk * GROUPS, (chunk + 1) * GROUPS) of its row.  Under PDL the
    # consumer (a GEMV) may launch at once and start on its weight.
    pdl_trigger(PDL)
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    groups = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)  # [GROUPS]
    cols = tl.arange(0, BLOCK)
    mask = (groups < num_groups)[:, None] & (cols < group_size)[None, :]
    offs = groups[:, None] * group_size + cols[None, :]  # [GROUPS, BLOCK]
    x = tl.load(x_ptr + row * x_row_stride + offs, mask=mask, other=0.0).to(tl.float32)
    # IEEE divisions, as torch's: Triton's default fp32 division is approximate (scales would differ in the last
    # bit, and a value could land on the other side of an fp8 rounding boundary).
    scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=1), eps), fp8_max)  # [GROUPS]
    y = round_to_e4m3(tl.clamp(tl.math.div_rn(x, scale[:, None]), -fp8_max, fp8_max))
    tl.store(q_ptr + row * num_groups * group_size + offs, y.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row * num_groups + groups, scale, mask=groups < num_groups)


def per_token_group_quant_fp8_triton(
    x: torch.Tensor,  # [M, K], unit stride along K
    group_size: int = 128,
    pdl: bool | None = None,  # launch with PDL (``radixlm.kernels.pdl``); default: where the device supports it
) -> tuple[torch.Tensor, torch.Tensor]:  # [M, K] fp8, [M, K // group_size] float32
    """``fp8.per_token_group_quant_fp8`` on any device Triton runs on (CUDA, or CPU under the interpreter)."""
    m, k = x.shape
    check_group_size(k, group_size)
    if x.stride(1) != 1:
        x = x.contiguous()
    x_q = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    num_groups = k // group_size
    scales = torch.empty((m, num_groups), dtype=torch.float32, device=x.device)
    if m:
        block = triton.next_power_of_2(group_size)
        groups = min(triton.next_power_of_2(num_groups), max(_QUANT_TILE // block, 1))
        _group_quant_kernel[(m, triton.cdiv(num_groups, groups))](
            x, x_q, scales, group_size, x.stride(0), num_groups, SCALE_EPS, FP8_MAX,
            GROUPS=groups, BLOCK=block, num_warps=4, **pdl_launch_kwargs(x.device, pdl),
        )
    return x_q, scales


@triton.jit
def _row_quant_kernel(x_ptr, q_ptr, s_ptr, k_dim, x_row_stride, eps, fp8_max, BLOCK: tl.constexpr,
                      CHUNK: tl.constexpr, ONE_TILE: tl.constexpr, PDL: tl.constexpr):
    # ONE_TILE: program (row, chunk) reads the whole row (one tile) for max |x|, then quantizes its CHUNK of it:
    # the divisions and roundings of a decode row spread over several SMs.  Otherwise program ``row`` walks the
    # row twice in BLOCK-wide chunks, for the max and then the quantization.  Under PDL as the group quantizer.
    pdl_trigger(PDL)
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    if ONE_TILE:
        cols = tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < k_dim, other=0.0).to(tl.float32)
        scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=0), eps), fp8_max)
        chunk = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
        mask = chunk < k_dim
        x = tl.load(x_row + chunk, mask=mask, other=0.0).to(tl.float32)
        y = round_to_e4m3(tl.clamp(tl.math.div_rn(x, scale), -fp8_max, fp8_max))
        tl.store(q_ptr + row * k_dim + chunk, y.to(q_ptr.dtype.element_ty), mask=mask)
    else:
        cols = tl.arange(0, BLOCK)
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, k_dim, BLOCK):
            x = tl.load(x_row + start + cols, mask=start + cols < k_dim, other=0.0)
            amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
        scale = tl.math.div_rn(tl.maximum(tl.max(amax, axis=0), eps), fp8_max)
        for start in range(0, k_dim, BLOCK):
            mask = start + cols < k_dim
            x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            y = round_to_e4m3(tl.clamp(tl.math.div_rn(x, scale), -fp8_max, fp8_max))
            tl.store(q_ptr + row * k_dim + start + cols, y.to(q_ptr.dtype.element_ty), mask=mask)
    if tl.program_id(1) == 0:
        tl.store(s_ptr + row, scale)


# Widest row ``per_token_quant_fp8_triton`` reads as one tile (16 warps: 32 values a thread), and the part of it
# each program quantizes.
_ROW_TILE = 16384
_ROW_CHUNK = 1024


def per_token_quant_fp8_triton(
    x: torch.Tensor,  # [M, K], unit stride along K
    pdl: bool | None = None,  # launch with PDL (``radixlm.kernels.pdl``); default: where the device supports it
) -> tuple[torch.Tensor, torch.Tensor]:  # [M, K] fp8, [M, 1] float32
    """One scale per row over any K (the online-FP8 activations): ``per_token_group_quant_fp8`` with one group
    of K, without its power-of-two tiles.  Rows up to ``_ROW_TILE`` wide (every Llama/Qwen hidden and
    intermediate size up to 16k) are read once per ``_ROW_CHUNK`` by several programs; wider ones in two passes
    by one."""
    m, k = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    x_q = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    scales = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        one_tile = k <= _ROW_TILE
        block = triton.next_power_of_2(k) if one_tile else _QUANT_TILE
        chunk = min(block, _ROW_CHUNK)
        _row_quant_kernel[(m, triton.cdiv(k, chunk) if one_tile else 1)](
            x, x_q, scales, k, x.stride(0), SCALE_EPS, FP8_MAX, BLOCK=block, CHUNK=chunk, ONE_TILE=one_tile,
            num_warps=max(4, min(16, block // 1024)), **pdl_launch_kwargs(x.device, pdl))
    return x_q, scales


def default_fp8_config(m: int, n: int, k: int, block_size: tuple[int, int]) -> GemmConfig:
    """Block sizes by M.  Decode-sized M (<= 64) streams the weight: the smallest M tile wastes least on
    padding, and more stages keep loads in flight.  Larger M is compute-bound: larger tiles reuse each load.
    ``block_k`` is the scale block's K size (128 for DeepSeek-V3), at most 128.  A starting point for the
    H200 sweep (``bench/gpu/fp8_gemm.py --tune``), not yet tuned."""
    block_k = min(block_size[1], 128)
    if m <= 16:
        return GemmConfig(16, 64, block_k, group_m=1, num_warps=4, num_stages=4)
    if m <= 64:
        return GemmConfig(64, 64, block_k, group_m=1, num_warps=4, num_stages=4)
    if m <= 256:
        return GemmConfig(64, 128, block_k, group_m=8, num_warps=4, num_stages=3)
    return GemmConfig(128, 128, block_k, group_m=8, num_warps=8, num_stages=3)


@triton.jit
def _w8a8_block_kernel(
    a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr,
    m_dim, n_dim, k_dim, group_n, group_k,
    stride_am, stride_bn, stride_cm, stride_asm, stride_bsn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_blocks_m = tl.cdiv(m_dim, BLOCK_M)
    num_blocks_n = tl.cdiv(n_dim, BLOCK_N)
    in_group = GROUP_M * num_blocks_n
    first_m = (pid // in_group) * GROUP_M
    group_size = min(num_blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Wrapped rows/columns keep every load in bounds without a mask; their results are not stored.
    offs_am = (offs_m % m_dim).to(tl.int64)
    offs_bn = (offs_n % n_dim).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_am[:, None] * stride_am + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    b_ptrs = b_ptr + offs_bn[None, :] * stride_bn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
    as_ptrs = as_ptr + offs_am * stride_asm  # [BLOCK_M]
    bs_ptrs = bs_ptr + (offs_bn // group_n) * stride_bsn  # [BLOCK_N]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(k_dim, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = offs_k < k_dim - k * BLOCK_K
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        k_slice = (k * BLOCK_K) // group_k
        a_s = tl.load(as_ptrs + k_slice)
        b_s = tl.load(bs_ptrs + k_slice)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m < m_dim)[:, None] & (offs_n < n_dim)[None, :])


def w8a8_block_fp8_matmul_triton(
    a_q: torch.Tensor,  # [M, K] fp8, unit stride along K
    a_s: torch.Tensor,  # [M, ceil(K / bk)] float32
    b_q: torch.Tensor,  # [N, K] fp8, unit stride along K
    b_s: torch.Tensor,  # [ceil(N / bn), ceil(K / bk)] float32
    block_size: tuple[int, int] = (128, 128),
    out_dtype: torch.dtype = torch.bfloat16,
    config: GemmConfig | None = None,
) -> torch.Tensor:  # [M, N] out_dtype
    """``fp8.w8a8_block_fp8_matmul`` on any device Triton runs on; ``config`` overrides ``default_fp8_config``."""
    m, k = a_q.shape
    n = b_q.shape[0]
    bn, bk = block_size
    if b_q.shape[1] != k or a_s.shape != (m, triton.cdiv(k, bk)) or b_s.shape != (triton.cdiv(n, bn),
                                                                                   triton.cdiv(k, bk)):
        raise ValueError(f"block FP8 GEMM shapes disagree: a {tuple(a_q.shape)}, a_s {tuple(a_s.shape)}, "
                         f"b {tuple(b_q.shape)}, b_s {tuple(b_s.shape)}, block {block_size}")
    if config is None:
        config = default_fp8_config(m, n, k, block_size)
    if bk % config.block_k:
        raise ValueError(f"block_k {config.block_k} must divide the scale block's K size {bk}")
    if a_q.stride(1) != 1:
        a_q = a_q.contiguous()
    if b_q.stride(1) != 1:
        b_q = b_q.contiguous()
    a_s, b_s = a_s.contiguous(), b_s.contiguous()
    c = torch.empty((m, n), dtype=out_dtype, device=a_q.device)
    if m == 0:
        return c
    grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n),)
    _w8a8_block_kernel[grid](
        a_q, b_q, c, a_s, b_s, m, n, k, bn, bk,
        a_q.stride(0), b_q.stride(0), c.stride(0), a_s.stride(0), b_s.stride(0),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        EVEN_K=k % config.block_k == 0, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return c
