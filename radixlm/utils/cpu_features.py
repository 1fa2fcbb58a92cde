"""What this CPU computes natively, read once from ``/proc/cpuinfo``."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch

# A 16-bit float dtype is native where one of these x86 flags is set; elsewhere torch emulates its arithmetic
# through float32 conversions, slower than float32 itself.
_NATIVE_HALF_FLAGS = {torch.bfloat16: {"avx512_bf16", "amx_bf16"}, torch.float16: {"avx512_fp16", "amx_fp16"}}


@cache
def cpu_flags() -> tuple[str, ...]:
    """The CPU's feature flags, in /proc/cpuinfo's order (x86 ``flags``, Arm ``Features``); empty where that file
    is missing (macOS, Windows)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ()
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return tuple(value.split())
    return ()


@cache
def native_half_dtypes() -> frozenset[torch.dtype]:
    """The 16-bit float dtypes (bfloat16, float16) this CPU has arithmetic instructions for."""
    flags = set(cpu_flags())
    return frozenset(dtype for dtype, needed in _NATIVE_HALF_FLAGS.items() if flags & needed)
