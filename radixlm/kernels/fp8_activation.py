"""An activation quantized to FP8 (E4M3) for an FP8 linear layer, and how a layer asks for one.

An FP8 linear quantizes its input per token per group of ``bk`` channels (block-FP8 weights), or (online FP8,
per-channel weights) per token where cuBLAS's row-wise GEMM takes it and per group of 128 channels for the decode
GEMV, which scales each K tile on its way in and whose producers (norm, SiLU-mul, attention) can then quantize a
few groups a program instead of needing the whole row's maximum.  The kernel that produces the input can do it instead, while it still holds the row
(``fused_quant``: RMSNorm, SiLU-mul), and hand the linear an ``FP8Activation``; the linear then skips its own
quantizer.  Either way the bits are the same: ``quantize_activation`` is the unfused form.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from radixlm.kernels import as_rows
from radixlm.kernels.fp8 import dequantize_block_fp8


# Rows at or below which the FP8 linears run the decode GEMV (``fp8_gemv``: one 16-row tile).
SMALL_M = 16


class ActivationQuant(NamedTuple):
    """The input quantization an FP8 linear wants: ``group_size`` channels per scale, None for one scale per
    token (over all of K); ``small_m_group_size``, where set, replaces it for ``SMALL_M`` rows or fewer.
    Producers resolve it for their row count first (``at``)."""

    group_size: int | None
    small_m_group_size: int | None = None

    def at(self, rows: int) -> "ActivationQuant":
        """The concrete quantization of ``rows`` rows."""
        if self.small_m_group_size is not None and rows <= SMALL_M:
            return ActivationQuant(self.small_m_group_size)
        return ActivationQuant(self.group_size)


class FP8Activation(NamedTuple):
    """``x`` [*shape] of ``dtype`` as an FP8 linear's input: ``x ~ q * scale`` per row (and group)."""

    q: torch.Tensor  # [M, K] float8_e4m3fn, M = prod(shape[:-1])
    scale: torch.Tensor  # [M, 1] (per token) or [M, K // group_size] float32
    dtype: torch.dtype  # the unquantized activation's dtype: the linear's output dtype
    shape: torch.Size  # the unquantized activation's shape [*, K]

    @property
    def is_cuda(self) -> bool:
        return self.q.is_cuda

    def num_groups(self) -> int:
        return self.scale.shape[1]

    def dequantize(self) -> torch.Tensor:
        """float32 [*shape]: what the FP8 GEMMs see of the activation (``round_activations``'s bits)."""
        group = self.q.shape[1] // self.num_groups()
        return dequantize_block_fp8(self.q, self.scale, (1, group)).view(self.shape)

    def check(self, quant: ActivationQuant) -> None:
        """ValueError unless quantized as ``quant`` asks (a per-token activation for a block weight, say)."""
        quant = quant.at(self.q.shape[0])
        k = self.q.shape[1]
        groups = 1 if quant.group_size is None else k // quant.group_size
        if self.num_groups() != groups or (quant.group_size is not None and k % quant.group_size):
            raise ValueError(f"an FP8 activation of K={k} with {self.num_groups()} scales per row, where the layer "
                             f"quantizes per {'token' if quant.group_size is None else quant.group_size}")


def quantize_activation(x: torch.Tensor, quant: ActivationQuant) -> FP8Activation:
    """``x`` [*, K] on CUDA (or CPU under the Triton interpreter) quantized as ``quant`` asks, by the Triton
    quantizers of ``fp8_gemm``."""
    from radixlm.kernels.fp8_gemm import per_token_group_quant_fp8_triton, per_token_quant_fp8_triton

    rows = as_rows(x)  # [M, K]
    quant = quant.at(rows.shape[0])
    if quant.group_size is None:
        q, scale = per_token_quant_fp8_triton(rows)
    else:
        q, scale = per_token_group_quant_fp8_triton(rows, quant.group_size)
    return FP8Activation(q, scale, x.dtype, x.shape)
