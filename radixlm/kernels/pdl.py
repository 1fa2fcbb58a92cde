"""Programmatic dependent launch (PDL, sm_90+) for the decode path's Triton kernels.

A kernel launched with PDL may start while the kernel before it on the stream is still running: as soon as
every program of that earlier kernel has called ``pdl_trigger`` (or exited).  ``pdl_wait`` returns once all
earlier kernels have finished and their writes are visible.  A decode step is a chain of short kernels (a
batch-1 GEMV streams a 16-25 MB weight in a few microseconds), and each launch and program setup can overlap
the kernel before it instead of following it.  The short kernels (norms, quantizers, rotary, K/V store, the
attention merge) trigger first thing; the two that stream memory (the FP8 GEMV, the split-KV decode attention)
trigger after their main loop, so the chain does not run ahead and park the next kernels' programs on the SMs
while they stream (with every kernel triggering first thing, online-FP8 Llama-8B batch-1 decode was 2.4 %
slower with PDL than without, run J2; the other way round, the quantizing norms and the merge triggering only
at exit, the FP8 step was 0.05-0.08 ms slower, run T6).  Doing more before the wait, a bulk L2 prefetch of the GEMV's weight,
was slower too (``fp8_gemv``).

The contract every PDL-launched kernel keeps: no load of an activation and no store of any kind before
``pdl_wait`` (its output buffer may still be read by an earlier kernel: the caching allocator reuses memory in
stream order).  ``pdl_trigger`` is safe anywhere: the dependent kernel waits for this one's completion anyway.
Kernels launched without PDL follow a PDL kernel as usual (the stream waits for it to finish), and CUDA graphs
capture PDL launches as programmatic edges, so decode's graphs keep the overlap.

``pdl_launch_kwargs(device)`` is what a launcher passes: ``launch_pdl=True`` on CUDA devices of compute
capability 9.0 or newer, unless ``RADIXLM_DISABLE_PDL=1`` (read once; a switch for drivers that misbehave).
Under the Triton interpreter the kernels get ``PDL=False`` and never trace the intrinsics.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # a Triton without grid dependency control: PDL stays off (see ``pdl_enabled``)
    gdc_launch_dependents = gdc_wait = None

# Read once: the interpreter is chosen before kernel modules are imported (see ``radixlm.kernels``).
_DISABLED = os.environ.get("RADIXLM_DISABLE_PDL", "0") not in ("", "0") or \
    os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _capable(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch with PDL (see the module docstring)."""
    return device.type == "cuda" and not _DISABLED and gdc_wait is not None and _capable(device)


def pdl_launch_kwargs(device: torch.device, enabled: bool | None = None) -> dict[str, bool]:
    """The launch options and the kernels' ``PDL`` constexpr for ``device`` (``enabled`` overrides the default,
    for benchmarks that compare both)."""
    on = pdl_enabled(device) if enabled is None else enabled and pdl_enabled(device)
    return {"launch_pdl": True, "PDL": True} if on else {"PDL": False}


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Wait for the earlier kernels on the stream (a no-op when not launched with PDL)."""
    if PDL:
        gdc_wait()


@triton.jit
def pdl_trigger(PDL: tl.constexpr):
    """Let the next PDL-launched kernel start."""
    if PDL:
        gdc_launch_dependents()
