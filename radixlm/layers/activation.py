from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from radixlm.kernels import fused_ops_for, fused_quant_for
from radixlm.kernels.fp8_activation import ActivationQuant, FP8Activation


class SiluAndMul(nn.Module):
    """``silu(gate) * up`` where the input is ``[..., 2 * d]`` = gate ‖ up (the merged gate_up projection)."""

    def forward(self, x: torch.Tensor, quant: ActivationQuant | None = None) -> torch.Tensor | FP8Activation:
        """CUDA tensors take one fused Triton kernel (rounded once, within about an ulp of the torch code), CPU
        tensors one C kernel (rounded as the torch code, within an ulp).  ``quant``: the next FP8 linear's
        ``input_quant``; where a kernel fuses it (``fused_quant_for``: CUDA) the result comes back as the
        ``FP8Activation`` that linear would make of it, elsewhere ``quant`` changes nothing."""
        fused_quant = None if quant is None else fused_quant_for(x)
        if fused_quant is not None:
            return fused_quant.silu_and_mul_quant_fp8(x, quant)
        fused_ops = fused_ops_for(x)
        return self.forward_native(x) if fused_ops is None else fused_ops.silu_and_mul(x)

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        """The torch implementation of ``forward``, on any device."""
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]
