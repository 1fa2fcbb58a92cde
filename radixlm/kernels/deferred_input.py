"""A linear layer's input handed over before it is computed, so that the decode GEMV computes it on the way in.

At decode sizes an online-FP8 linear takes its input unquantized (W8A16: ``fp8_gemv.fp8_gemv_w8a16``), and what
produces that input, an RMSNorm (with the residual add before it) or SiLU-mul, is elementwise along K but for the
norm's one statistic per row.  Launched as a kernel of its own it is a few microseconds of a decode layer between
two weight streams; computed by the GEMV, per K tile from the producer's inputs, it costs that launch less.

The producer returns one of these instead of its output (``RMSNorm`` and ``SiluAndMul``, asked by the linear's
``input_quant``: ``ActivationQuant.at`` is None at that size); the linear takes it into its GEMV, or anything else
calls ``materialize()``, which runs the producer's own kernel.  The two give the same values but for the norm's
sum of squares, reduced in another order (within about an ulp, as ``fused_ops.rms_norm`` is of torch).  CUDA only:
the producers defer on CUDA tensors only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class NormedInput(NamedTuple):
    """``rms_norm(x [+ residual]) * weight`` of ``x`` [M, K], not computed yet.  With a residual, ``new_residual``
    [M, K] (``x + residual``, the stream the model carries on) is written by whichever kernel computes the norm:
    it holds its values once the consumer has run."""

    x: torch.Tensor  # [M, K], unit stride along K
    residual: torch.Tensor | None  # [M, K]
    weight: torch.Tensor  # [K]
    eps: float
    new_residual: torch.Tensor | None  # [M, K], written by the consumer

    @property
    def shape(self) -> torch.Size:
        return self.x.shape

    @property
    def dtype(self) -> torch.dtype:
        """The normalised output's dtype (``fused_ops.norm_operands``)."""
        stream = self.x.dtype if self.new_residual is None else self.new_residual.dtype
        return torch.promote_types(self.weight.dtype, stream)

    @property
    def is_cuda(self) -> bool:
        return self.x.is_cuda

    def materialize(self) -> torch.Tensor:
        """The norm's output [M, K], by ``fused_ops``' kernel (writing ``new_residual`` too)."""
        from radixlm.kernels import fused_ops

        if self.residual is None:
            return fused_ops.rms_norm(self.x, self.weight, self.eps)
        return fused_ops.fused_add_rms_norm(self.x, self.residual, self.weight, self.eps, self.new_residual)[0]


class SiluMulInput(NamedTuple):
    """``silu(gate) * up`` of ``gate_up`` [M, 2 * d] = gate ‖ up, not computed yet."""

    gate_up: torch.Tensor  # [M, 2 * d], unit stride along the last dim

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.gate_up.shape[:-1], self.gate_up.shape[-1] // 2))

    @property
    def dtype(self) -> torch.dtype:
        return self.gate_up.dtype

    @property
    def is_cuda(self) -> bool:
        return self.gate_up.is_cuda

    def materialize(self) -> torch.Tensor:
        """``silu(gate) * up`` [M, d], by ``fused_ops``' kernel."""
        from radixlm.kernels import fused_ops

        return fused_ops.silu_and_mul(self.gate_up)


DeferredInput = NormedInput | SiluMulInput
