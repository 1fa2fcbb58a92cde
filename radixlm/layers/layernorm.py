"""RMSNorm, optionally fused with the residual add that precedes it."""

from __future__ import annotations

import torch
from torch import nn

from radixlm.kernels import as_rows, fused_ops_for, fused_quant_for
from radixlm.kernels.deferred_input import NormedInput
from radixlm.kernels.fp8_activation import ActivationQuant, FP8Activation

Normed = torch.Tensor | FP8Activation | NormedInput


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, quant: ActivationQuant | None = None
    ) -> Normed | tuple[Normed, torch.Tensor]:
        """``norm(x)``, or with ``residual``: ``(norm(x + residual), x + residual)``.

        Statistics are computed in float32 and the result is cast back before the weight is applied, the same
        order of rounding as HF transformers.  CUDA tensors take one fused Triton kernel, CPU tensors one C
        kernel (both: same residual bits, output within about an ulp), others the torch code of ``forward_native``.

        ``quant``: the next FP8 linear's ``input_quant``.  Where a kernel fuses it (``fused_quant_for``: CUDA),
        ``norm(...)`` comes back as an ``FP8Activation``, the bits that linear's own quantizer would make of the
        tensor returned otherwise, or, at a size where that linear takes its input unquantized (``quant.at`` is
        None), as a ``NormedInput`` for its GEMV to compute (``x + residual`` is then written by that GEMV);
        elsewhere ``quant`` changes nothing.
        """
        fused_quant = None if quant is None else fused_quant_for(x)
        if fused_quant is not None:
            if quant.at(x.numel() // x.shape[-1]) is None:
                if self.weight.dtype == x.dtype:
                    return self._deferred(x, residual)
            else:
                out, new_residual = fused_quant.rms_norm_quant_fp8(x, residual, self.weight, self.eps, quant)
                return out if residual is None else (out, new_residual)
        fused_ops = fused_ops_for(x)
        if fused_ops is None:
            return self.forward_native(x, residual)
        if residual is None:
            return fused_ops.rms_norm(x, self.weight, self.eps)
        return fused_ops.fused_add_rms_norm(x, residual, self.weight, self.eps)

    def _deferred(self, x: torch.Tensor, residual: torch.Tensor | None) -> Normed | tuple[Normed, torch.Tensor]:
        """The norm as a ``NormedInput`` for the next linear's GEMV (with the new residual it will write)."""
        x2d = as_rows(x)  # [rows, hidden]
        if residual is None:
            return NormedInput(x2d, None, self.weight, self.eps, None)
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} does not match x {tuple(x.shape)} "
                             f"{x.dtype}")
        new_residual = torch.empty_like(x2d, memory_format=torch.contiguous_format)
        return NormedInput(x2d, as_rows(residual), self.weight, self.eps, new_residual), new_residual.view(x.shape)

    def forward_native(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The torch implementation of ``forward``, on any device."""
        if residual is not None:
            x = x + residual
            residual = x
        orig_dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(orig_dtype)
        return out if residual is None else (out, residual)
