"""RMSNorm, optionally fused with the residual add that precedes it."""

from __future__ import annotations

import torch
from torch import nn

from radixlm.kernels import fused_ops_for, fused_quant_for
from radixlm.kernels.fp8_activation import ActivationQuant, FP8Activation


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, quant: ActivationQuant | None = None
    ) -> torch.Tensor | FP8Activation | tuple[torch.Tensor | FP8Activation, torch.Tensor]:
        """``norm(x)``, or with ``residual``: ``(norm(x + residual), x + residual)``.

        Statistics are computed in float32 and the result is cast back before the weight is applied, the same
        order of rounding as HF transformers.  CUDA tensors take one fused Triton kernel, CPU tensors one C
        kernel (both: same residual bits, output within about an ulp), others the torch code of ``forward_native``.

        ``quant``: the next FP8 linear's ``input_quant``.  Where a kernel fuses it (``fused_quant_for``: CUDA),
        ``norm(...)`` comes back as an ``FP8Activation``, the bits that linear's own quantizer would make of the
        tensor returned otherwise; elsewhere ``quant`` changes nothing.
        """
        fused_quant = None if quant is None else fused_quant_for(x)
        if fused_quant is not None:
            out, new_residual = fused_quant.rms_norm_quant_fp8(x, residual, self.weight, self.eps, quant)
            return out if residual is None else (out, new_residual)
        fused_ops = fused_ops_for(x)
        if fused_ops is None:
            return self.forward_native(x, residual)
        if residual is None:
            return fused_ops.rms_norm(x, self.weight, self.eps)
        return fused_ops.fused_add_rms_norm(x, residual, self.weight, self.eps)

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
