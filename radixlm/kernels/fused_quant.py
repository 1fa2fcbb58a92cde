"""RMSNorm (optionally with the residual add) and SiLU-mul whose output is an FP8 linear's quantized input.

An FP8 linear quantizes its input with a Triton kernel of its own (``fp8_gemm``: one scale per token, or per
token per group of ``bk`` channels); after a norm or SiLU-mul, which already hold the row, that launch and the
round trip of the unquantized activation through memory are saved by quantizing there.  The result is
bit-identical to the composition it replaces, ``fused_ops``' kernel then the quantizer: the same norm / SiLU-mul
arithmetic (the ``fused_ops`` helpers, the norm's row reduced by as many warps, so in the same order), rounded to
the output dtype, then quantized as ``fp8_gemm`` quantizes (``round_to_e4m3``, IEEE divisions, the same scale
floor).

Programs split a row as the per-token quantizer does, so a decode row spreads over several SMs: program (row,
chunk) quantizes ``CHUNK`` columns of its row.  A per-token scale needs max |out| of the whole row, so each norm
program computes the whole row's output for it (the norm needs the row's sum of squares in any case; the row is
read from L2) and then recomputes its chunk's to quantize.  Per-group scales need only the program's own groups.
SiLU-mul fuses per-group quantization only (``silu_and_mul_quant_fp8`` says why).  Like every kernel of the decode layer, they launch with PDL where the
device has it (``radixlm.kernels.pdl``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixlm.kernels import as_rows
from radixlm.kernels.fp8 import FP8_DTYPE, FP8_MAX, SCALE_EPS, check_group_size
from radixlm.kernels.fp8_activation import ActivationQuant, FP8Activation, quantize_activation
from radixlm.kernels.fp8_gemm import round_to_e4m3
from radixlm.kernels.fused_ops import (
    inv_rms, norm_input, norm_num_warps, norm_operands, rms_apply, silu_and_mul, silu_mul,
)
from radixlm.kernels.pdl import pdl_launch_kwargs, pdl_trigger, pdl_wait

# Columns one program quantizes (per token), or about that many in whole groups (per group).  One program a row
# (4096 or 16384) was slower at decode on an H200 even quantizing the row it had read, without a second read
# (GPU run R1: the 128-group norm 2.10 against 1.42 us at M = 1, a Llama-8B step 2.85-2.94 against 2.76 ms).
_CHUNK = 1024
TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def quantize_e4m3(y, scale, fp8_max):
    """fp32 ``y`` over its (broadcast) ``scale`` to E4M3 values, as ``fp8_gemm``'s quantizers do."""
    return round_to_e4m3(tl.clamp(tl.math.div_rn(y, scale), -fp8_max, fp8_max))


@triton.jit
def _group_tile(n_cols, GROUP: tl.constexpr, GROUPS: tl.constexpr, BLOCK_G: tl.constexpr):
    """This program's groups of a row [GROUPS], their columns [GROUPS, BLOCK_G] and which of those exist."""
    groups = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)  # [GROUPS]
    lanes = tl.arange(0, BLOCK_G)  # [BLOCK_G]
    cols = groups[:, None] * GROUP + lanes[None, :]  # [GROUPS, BLOCK_G]
    return groups, cols, (groups < n_cols // GROUP)[:, None] & (lanes < GROUP)[None, :]


@triton.jit
def _rms_norm_quant_kernel(
    x_ptr, residual_ptr, weight_ptr, q_ptr, s_ptr, new_residual_ptr,
    x_row_stride, residual_row_stride, n_cols, eps, scale_eps, fp8_max,
    HAS_RESIDUAL: tl.constexpr, OUT_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
    GROUP: tl.constexpr, GROUPS: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr,
):
    # Under PDL the consumer (the FP8 GEMV) may launch at once and start on its weight, as after the quantizers.
    pdl_trigger(PDL)
    pdl_wait(PDL)
    # GROUP 0: one scale per row, program (row, c) quantizes columns [c * CHUNK, (c + 1) * CHUNK).  Otherwise
    # groups of GROUP columns, held in CHUNK (a power of two >= GROUP) lanes each: program (row, c) quantizes
    # groups [c * GROUPS, (c + 1) * GROUPS).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    x = norm_input(x_ptr, residual_ptr, new_residual_ptr, row, x_row_stride, residual_row_stride, cols,
                   cols < n_cols, HAS_RESIDUAL)
    inv = inv_rms(x, n_cols, eps)
    if GROUP == 0:
        weight = tl.load(weight_ptr + cols, mask=cols < n_cols, other=0.0)
        out = rms_apply(x, inv, weight).to(OUT_DTYPE).to(tl.float32)
        scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(out), axis=0), scale_eps), fp8_max)
        chunk = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)  # [CHUNK]
        mask = chunk < n_cols
    else:
        groups, chunk, mask = _group_tile(n_cols, GROUP, GROUPS, CHUNK)
    xc = norm_input(x_ptr, residual_ptr, new_residual_ptr, row, x_row_stride, residual_row_stride, chunk, mask,
                    HAS_RESIDUAL)
    if HAS_RESIDUAL:
        tl.store(new_residual_ptr + row * n_cols + chunk, xc, mask=mask)
    out_c = rms_apply(xc, inv, tl.load(weight_ptr + chunk, mask=mask, other=0.0)).to(OUT_DTYPE).to(tl.float32)
    if GROUP == 0:
        tl.store(q_ptr + row * n_cols + chunk, quantize_e4m3(out_c, scale, fp8_max).to(q_ptr.dtype.element_ty),
                 mask=mask)
        if tl.program_id(1) == 0:
            tl.store(s_ptr + row, scale)
    else:
        scales = tl.math.div_rn(tl.maximum(tl.max(tl.abs(out_c), axis=1), scale_eps), fp8_max)  # [GROUPS]
        tl.store(q_ptr + row * n_cols + chunk,
                 quantize_e4m3(out_c, scales[:, None], fp8_max).to(q_ptr.dtype.element_ty), mask=mask)
        num_groups = n_cols // GROUP
        tl.store(s_ptr + row * num_groups + groups, scales, mask=groups < num_groups)


def _split(k: int, quant: ActivationQuant) -> tuple[int, int, int, int]:
    """(GROUP, GROUPS, CHUNK, programs per row) of a row of ``k`` quantized as ``quant`` asks: per token, CHUNK
    columns a program, at most half the row's block; per group, GROUPS groups of CHUNK lanes (GROUP used) a
    program.

    Per token a program never takes the whole row: a chunk of the row's own shape lets the compiler lay the row
    out for the chunk's FP8 store, and the sum of squares it reduces in that layout came out in other bits than
    the plain norm's on an H200 (GPU runs R2-R3: a 4096-wide row in one program, some of 300 rows; 2304-wide
    fp32 rows with FP contraction off).  Group tiles are two-dimensional, so the row keeps its own layout."""
    if quant.group_size is None:
        chunk = max(min(triton.next_power_of_2(k) // 2, _CHUNK), 1)
        return 0, 1, chunk, triton.cdiv(k, chunk)
    group = quant.group_size
    check_group_size(k, group)
    lanes = triton.next_power_of_2(group)
    groups = min(triton.next_power_of_2(k // group), max(_CHUNK // lanes, 1))
    return group, groups, lanes, triton.cdiv(k // group, groups)


def _new_quantized(rows: int, k: int, quant: ActivationQuant, device: torch.device) -> tuple[torch.Tensor,
                                                                                             torch.Tensor]:
    q = torch.empty((rows, k), dtype=FP8_DTYPE, device=device)  # [rows, k]
    groups = 1 if quant.group_size is None else k // quant.group_size
    return q, torch.empty((rows, groups), dtype=torch.float32, device=device)  # [rows, groups]


def rms_norm_quant_fp8(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, quant: ActivationQuant,
) -> tuple[FP8Activation, torch.Tensor | None]:
    """``fused_ops.rms_norm(x, weight, eps)`` (``residual`` None) or ``fused_ops.fused_add_rms_norm(x, residual,
    weight, eps)`` with the normalised output quantized as ``quant`` asks instead of written: returns (that
    output as an ``FP8Activation``, of the dtype and shape ``rms_norm`` returns, and the new residual or None).

    ``x`` (and ``residual``) [..., hidden], hidden <= ``fused_ops.MAX_NORM_HIDDEN`` and a multiple of the group size.  Bits
    equal to the norm kernel followed by ``fp8_activation.quantize_activation``."""
    hidden = x.shape[-1]
    x2d, residual2d, new_residual, out_dtype = norm_operands(x, residual, weight)  # out_dtype: the norm output's
    quant = quant.at(x2d.shape[0])
    group, groups, chunk, chunks = _split(hidden, quant)
    q, scale = _new_quantized(x2d.shape[0], hidden, quant, x.device)
    if x2d.shape[0]:
        block = triton.next_power_of_2(hidden)
        _rms_norm_quant_kernel[(x2d.shape[0], chunks)](
            x2d, residual2d, weight, q, scale, new_residual,
            x2d.stride(0), 0 if residual2d is None else residual2d.stride(0), hidden, eps, SCALE_EPS, FP8_MAX,
            HAS_RESIDUAL=residual is not None, OUT_DTYPE=TL_DTYPES[out_dtype], BLOCK=block,
            GROUP=group, GROUPS=groups, CHUNK=chunk, num_warps=norm_num_warps(block),
            **pdl_launch_kwargs(x.device),
        )
    return FP8Activation(q, scale, out_dtype, x.shape), new_residual


@triton.jit
def _silu_mul_quant_kernel(
    x_ptr, q_ptr, s_ptr, x_row_stride, d, scale_eps, fp8_max,
    OUT_DTYPE: tl.constexpr, GROUP: tl.constexpr, GROUPS: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr,
):
    # Program (row, chunk): GROUPS whole groups of its row, as ``_rms_norm_quant_kernel`` splits per group.
    pdl_trigger(PDL)
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    gate_ptr = x_ptr + row * x_row_stride
    groups, chunk, mask = _group_tile(d, GROUP, GROUPS, CHUNK)
    out_c = silu_mul(tl.load(gate_ptr + chunk, mask=mask, other=0.0),
                     tl.load(gate_ptr + d + chunk, mask=mask, other=0.0)).to(OUT_DTYPE).to(tl.float32)
    scales = tl.math.div_rn(tl.maximum(tl.max(tl.abs(out_c), axis=1), scale_eps), fp8_max)  # [GROUPS]
    tl.store(q_ptr + row * d + chunk, quantize_e4m3(out_c, scales[:, None], fp8_max).to(q_ptr.dtype.element_ty),
             mask=mask)
    num_groups = d // GROUP
    tl.store(s_ptr + row * num_groups + groups, scales, mask=groups < num_groups)


def silu_and_mul_quant_fp8(x: torch.Tensor, quant: ActivationQuant) -> FP8Activation:
    """``fused_ops.silu_and_mul(x)`` quantized as ``quant`` asks instead of written, as an ``FP8Activation`` of
    [..., d] in x's dtype.  ``x`` [..., 2 * d], d a multiple of the group size.  Bits equal to
    ``silu_and_mul`` followed by ``fp8_activation.quantize_activation``.

    Per group one kernel.  Per token it is that composition itself: a fused kernel needs max |out| of the whole
    row in every program, and recomputing SiLU-mul over a 14336-wide row cost more than the quantizer's launch
    saves (H200, run J3: 3.32 against 2.19 us at M = 1, 6.52 against 4.06 at M = 16; the norms, whose row is
    reduced anyway, gain: ``rms_norm_quant_fp8``)."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even last dim, got {x.shape[-1]}")
    x2d = as_rows(x)  # [rows, 2 * d]
    quant = quant.at(x2d.shape[0])
    if quant.group_size is None:
        return quantize_activation(silu_and_mul(x), quant)
    d = x.shape[-1] // 2
    group, groups, chunk, chunks = _split(d, quant)
    q, scale = _new_quantized(x2d.shape[0], d, quant, x.device)
    if x2d.shape[0] and d:
        _silu_mul_quant_kernel[(x2d.shape[0], chunks)](
            x2d, q, scale, x2d.stride(0), d, SCALE_EPS, FP8_MAX,
            OUT_DTYPE=TL_DTYPES[x.dtype], GROUP=group, GROUPS=groups, CHUNK=chunk, num_warps=4,
            **pdl_launch_kwargs(x.device),
        )
    return FP8Activation(q, scale, x.dtype, torch.Size((*x.shape[:-1], d)))
