"""``DeadlinePool``: calls that cannot be cancelled, answered by their deadline, stuck workers replaced up to a
cap.  Calls here block on events the test controls; ``expire`` gets an explicit clock, so nothing is timed."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import pytest

from radixlm.constrained.compile_pool import DeadlinePool

WAIT_S = 10.0  # bound on waiting for a worker thread (detects hangs; never reached when things work)


class Timeout(Exception):
    pass


def make(num_workers: int = 1, max_abandoned: int = 1, late: list | None = None) -> DeadlinePool:
    return DeadlinePool(num_workers, timeout=5.0, max_abandoned=max_abandoned,
                        on_timeout=lambda key, started: Timeout(f"{key} started={started}"),
                        on_late=None if late is None else lambda *outcome: late.append(outcome))


def blocked(release: threading.Event, started: threading.Event | None = None, value: object = "done"):
    def call() -> object:
        if started is not None:
            started.set()
        assert release.wait(WAIT_S)
        return value
    return call


def error_of(future: Future) -> str:
    return str(future.exception(timeout=0))


def test_calls_run_and_fail_as_themselves() -> None:
    pool = make()
    assert pool.submit("a", lambda: 41 + 1).result(WAIT_S) == 42
    with pytest.raises(ZeroDivisionError):
        pool.submit("b", lambda: 1 / 0).result(WAIT_S)


def test_a_stuck_call_is_answered_at_its_deadline_and_its_worker_replaced() -> None:
    late: list = []
    pool = make(late=late)
    release, started = threading.Event(), threading.Event()
    stuck = pool.submit("stuck", blocked(release, started, "slow result"))
    assert started.wait(WAIT_S)
    deadline = pool.next_deadline()
    pool.expire(deadline - 0.5)
    assert not stuck.done()  # before the deadline nothing is answered
    pool.expire(deadline)
    assert error_of(stuck) == "stuck started=True"
    assert pool.abandoned == 1 and pool.threads == 2
    assert pool.submit("queued", lambda: "quick").result(WAIT_S) == "quick"  # the replacement worker ran it
    assert pool.submit("next", lambda: "also quick").result(WAIT_S) == "also quick"
    release.set()  # the abandoned call returns: its outcome goes to on_late, its thread ends
    deadline = time.monotonic() + WAIT_S  # a bound on waiting for the thread, not an assertion on time
    while (pool.abandoned or not late) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert late == [("stuck", "slow result", None)] and pool.abandoned == 0 and pool.threads == 1


def test_beyond_the_cap_an_overdue_call_keeps_its_worker_and_queued_calls_time_out() -> None:
    pool = make(num_workers=1, max_abandoned=1)
    first_release, second_release = threading.Event(), threading.Event()
    first_started, second_started = threading.Event(), threading.Event()
    first = pool.submit("first", blocked(first_release, first_started))
    assert first_started.wait(WAIT_S)
    pool.expire(time.monotonic() + 5.0)  # abandoned: a replacement starts
    second = pool.submit("second", blocked(second_release, second_started))
    assert second_started.wait(WAIT_S)
    pool.expire(time.monotonic() + 10.0)  # at the cap: answered, but no replacement
    assert error_of(first) == "first started=True" and error_of(second) == "second started=True"
    assert pool.abandoned == 1 and pool.threads == 2  # never more than num_workers + max_abandoned
    waiting = pool.submit("waiting", lambda: "ran")
    pool.expire(time.monotonic() + 20.0)
    assert error_of(waiting) == "waiting started=False"  # answered by its deadline although no worker was free
    second_release.set()  # the worker kept by the overdue call comes back
    assert pool.submit("later", lambda: "ran").result(WAIT_S) == "ran"
    first_release.set()


def test_next_deadline_is_the_earliest_unanswered() -> None:
    pool = make()
    assert pool.next_deadline() is None
    release = threading.Event()
    before = time.monotonic()
    future = pool.submit("x", blocked(release))
    assert before + 5.0 <= pool.next_deadline() <= time.monotonic() + 5.0
    release.set()
    future.result(WAIT_S)
    assert pool.next_deadline() is None


def test_held_clocks_stand_still() -> None:
    """Time spent held (building what every call needs) does not count against the calls' deadlines."""
    pool = make()
    pool.hold()
    release, started = threading.Event(), threading.Event()
    future = pool.submit("x", blocked(release, started))
    assert started.wait(WAIT_S)
    pool.expire(time.monotonic() + 100.0)  # held: nothing expires
    assert not future.done()
    held_from = time.monotonic()
    pool.release()
    assert pool.next_deadline() >= held_from + 5.0
    pool.expire(pool.next_deadline())
    assert error_of(future) == "x started=True"
    release.set()
