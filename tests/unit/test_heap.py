"""``HeapTrimmer``: trims at most once per interval, and really calls glibc's malloc_trim where there is one."""

from __future__ import annotations

import time

from radixlm.utils.heap import HeapTrimmer, _malloc_trim


def test_trims_at_most_once_per_interval(monkeypatch):
    calls = []
    trimmer = HeapTrimmer(interval_s=0.05)
    monkeypatch.setattr(trimmer, "_trim", lambda pad: calls.append(pad) or 1)
    assert not trimmer.maybe_trim() and calls == []  # the first interval has not passed
    time.sleep(0.06)
    assert trimmer.maybe_trim() and calls == [0]
    assert not trimmer.maybe_trim() and calls == [0]


def test_glibc_trim_is_found_and_callable():
    trim = _malloc_trim()
    assert trim is not None  # the CI machines run glibc
    assert trim(0) in (0, 1)
