"""A linear layer's output left as the fp32 partial sums of its K splits, for the kernel that consumes it to add.

The decode GEMV (``fp8_gemv``) splits K over several programs when N alone leaves the GPU idle; someone must then
add the splits' partials.  Inside the GEMV that is the last program to arrive at each column tile (an atomic
counter, a fence, a re-read of the partials): a serial tail at the end of every projection, about 0.1 ms of an FP8
Llama-8B batch-1 decode step on an H200 (GPU run P3, the three split projections).  The kernel after the GEMV has
to wait for it anyway and reads the output once, so it can read the partials instead and add them on the way in:
that is ``PartialSums``.  The consumer adds them in split order in fp32 and rounds to ``dtype``, exactly what the
GEMV's own reduction stores, so the bits after are the same.

Consumers that take one: the norms with a residual add (``fused_ops.fused_add_rms_norm``,
``fused_quant.rms_norm_quant_fp8``), which follow the o and down projections.  A layer returns one only where its
owner said the consumer takes it (``RowParallelLinear.partial_sums_ok``), and only from the GEMV (CUDA, decode-sized
M, K split); anything else may call ``materialize``.  Kernels read one through ``fused_ops.load_summed``.  (No
triton import here: CPU code handles the type.)
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class PartialSums(NamedTuple):
    """``y`` [M, N] of ``dtype`` as ``sum(parts[s] for s in range(S))``, added in that order in fp32, then
    rounded to ``dtype``."""

    parts: torch.Tensor  # [S, M, N] float32, unit stride along N
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.parts.shape[1:]

    @property
    def is_cuda(self) -> bool:
        return self.parts.is_cuda

    @property
    def device(self) -> torch.device:
        return self.parts.device

    def materialize(self) -> torch.Tensor:
        """The tensor ``y`` [M, N] (the GEMV's own reduction's bits)."""
        total = self.parts[0].clone()
        for s in range(1, self.parts.shape[0]):
            total += self.parts[s]
        return total.to(self.dtype)


def rows_of(x: "torch.Tensor | PartialSums") -> tuple[torch.Tensor, int, int, torch.dtype]:
    """What a consumer kernel needs to read ``x`` [M, N] by rows: (the tensor to pass as its pointer, the number of
    parts (1: a plain tensor), the stride between parts, the dtype to round the sum to)."""
    if isinstance(x, PartialSums):
        return x.parts, x.parts.shape[0], x.parts.stride(0), x.dtype
    return x, 1, 0, x.dtype
