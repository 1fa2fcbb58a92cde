"""Giving freed heap memory back to the OS (glibc's ``malloc_trim``), so that a long-running process's RSS tracks
what it uses.

A scheduler allocates and frees tensors of ever-changing sizes each step (batches, prefix lengths).  glibc serves
large ones from its heap once its dynamic mmap threshold has risen, and freed holes inside the heap stay resident:
a 10-minute soak on the CPU saw the scheduler's RSS climb by 180 MiB and keep climbing, while the same run with a
fixed 64 KiB threshold (``MALLOC_MMAP_THRESHOLD_``) stayed flat, at a 17% cost in decode throughput (every large
tensor an mmap).  ``malloc_trim(0)`` now and then returns the free pages inside the heap (``MADV_DONTNEED``) at
the cost of one walk over the free lists, and leaves the fast path of every allocation as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from collections.abc import Callable

TRIM_INTERVAL_S = 10.0


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None


class HeapTrimmer:
    """Call ``maybe_trim()`` from a loop: at most every ``interval_s`` seconds it trims the heap (a no-op off glibc)."""

    def __init__(self, interval_s: float = TRIM_INTERVAL_S) -> None:
        self._trim = _malloc_trim()
        self._interval_s = interval_s
        self._next = time.monotonic() + interval_s

    def maybe_trim(self) -> bool:
        """Whether it trimmed now."""
        if self._trim is None or time.monotonic() < self._next:
            return False
        self._trim(0)
        self._next = time.monotonic() + self._interval_s
        return True
