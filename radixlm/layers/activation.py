from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from radixlm.kernels import cpu


class SiluAndMul(nn.Module):
    """``silu(gate) * up`` where the input is ``[..., 2 * d]`` = gate ‖ up (the merged gate_up projection)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """CUDA tensors take one fused Triton kernel (rounded once, within about an ulp of the torch code), CPU
        tensors one C kernel (rounded as the torch code, within an ulp)."""
        if x.is_cuda:
            from radixlm.kernels import fused_ops  # imported here: CPU-only installs may lack triton
            return fused_ops.silu_and_mul(x)
        if cpu.supports(x):
            return cpu.silu_and_mul(x)
        return self.forward_native(x)

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        """The torch implementation of ``forward``, on any device."""
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]
