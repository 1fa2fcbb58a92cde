"""The engine's kernels, one module each: Triton kernels for the GPU (``decode_attention``, ``extend_attention``,
``fused_ops``, ``fused_quant``, ``fused_moe``, ``moe_routing``, ``fp8``, ``lora``) and C kernels for the CPU
(``cpu``).

No kernel module is imported here (``fused_ops_for`` and ``fused_quant_for`` import on demand): importing a Triton
module decorates its kernels, which must happen after a test has chosen the Triton interpreter, and CPU-only code
never needs triton.
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


def fused_quant_for(x: "torch.Tensor") -> ModuleType | None:
    """The norm / SiLU-mul kernels that quantize their output for an FP8 linear (``fused_quant``:
    ``rms_norm_quant_fp8``, ``silu_and_mul_quant_fp8``) for tensors like ``x``: Triton's on CUDA; None elsewhere,
    where the layers return their output unquantized and the FP8 linear rounds it (the CPU path's reference
    numerics).  The one place that decides whether quantization is fused."""
    if x.is_cuda:
        from radixlm.kernels import fused_quant

        return fused_quant
    return None
