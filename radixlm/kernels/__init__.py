"""The engine's kernels, one module each: Triton kernels for the GPU (``decode_attention``, ``extend_attention``,
``fused_ops``, ``fused_moe``, ``moe_routing``, ``fp8``) and C kernels for the CPU (``cpu``).

No kernel module is imported here (``fused_ops_for`` imports on demand): importing a Triton module decorates its
kernels, which must happen after a test has chosen the Triton interpreter, and CPU-only code never needs triton.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def as_rows(x: "torch.Tensor") -> "torch.Tensor":
    """``x`` as ``[rows, last_dim]`` with a unit last-dim stride: a view where strides allow, else a copy."""
    if x.dim() == 2 and x.stride(1) == 1:  # the common case, without reshape's host overhead
        return x
    x2d = x.reshape(-1, x.shape[-1])
    return x2d if x2d.stride(-1) == 1 else x2d.contiguous()


def fused_ops_for(x: "torch.Tensor") -> ModuleType | None:
    """The fused norm / rotary / SiLU-mul kernels for tensors like ``x`` (one module interface: ``rms_norm``,
    ``fused_add_rms_norm``, ``silu_and_mul``, ``apply_rotary``): Triton's on CUDA, the C kernels on CPU where they
    are built; None where the layers run their torch code."""
    if x.is_cuda:
        from radixlm.kernels import fused_ops  # imported here: CPU-only installs may lack triton

        return fused_ops
    from radixlm.kernels import cpu

    return cpu if cpu.supports(x) else None
