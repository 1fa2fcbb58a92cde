"""Worker threads for calls that cannot be cancelled, each answered within a deadline.

XGrammar's compilation releases the GIL but cannot be interrupted: a pathological regex such as
``(.{0,60}){0,60}`` keeps a core busy for seconds to hours.  ``DeadlinePool`` runs such calls on a fixed number of
worker threads and answers every call's future by its deadline (``timeout`` seconds after ``submit``): whoever
waits gets the error of ``on_timeout`` then, whether the call is still queued or running.

A call still running at its deadline is *abandoned*: its thread goes on burning CPU until the call returns (nothing
can stop it), but a replacement thread takes its place at once, so the pool keeps ``num_workers`` live workers and
other calls are unaffected.  At most ``max_abandoned`` abandoned calls may be running at a time; beyond that an
overdue call still gets its error on time but keeps its worker (no replacement is started), so the pool shrinks
and queued calls wait, each answered with the timeout error at its own deadline if no worker frees up; the pool
recovers as the overdue calls return.  So at most ``num_workers + max_abandoned`` threads ever run calls.

While the pool is *held* (``hold`` .. ``release``: e.g. while something every call needs is being built), the
clocks of its calls stand still: a call's deadline is ``timeout`` seconds of unheld time after its submission.

A call that returns after its deadline hands its outcome to ``on_late`` (e.g. to cache a result that was slow
once).  Deadlines are enforced by ``expire``, which the owner calls regularly (the scheduler, every step).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Call:
    key: Any
    fn: Callable[[], Any]
    deadline: float
    future: Future = field(default_factory=Future)
    abandoned: bool = False


class DeadlinePool:
    def __init__(self, num_workers: int, timeout: float, max_abandoned: int,
                 on_timeout: Callable[[Any, bool], Exception],
                 on_late: Callable[[Any, Any, BaseException | None], None] | None = None,
                 name: str = "deadline-pool") -> None:
        self.timeout = timeout
        self._max_abandoned = max_abandoned
        self._on_timeout = on_timeout
        self._on_late = on_late
        self._name = name
        self._cond = threading.Condition()
        self._queue: deque[_Call] = deque()
        self._running: set[_Call] = set()
        self._abandoned = 0
        self._threads = 0
        self._held_since: float | None = None
        for _ in range(num_workers):
            self._start_worker()

    @property
    def abandoned(self) -> int:
        """Calls past their deadline whose thread was replaced and that are still running."""
        with self._cond:
            return self._abandoned

    @property
    def threads(self) -> int:
        """Worker threads alive (live workers plus abandoned calls still running)."""
        with self._cond:
            return self._threads

    def submit(self, key: Any, fn: Callable[[], Any]) -> Future:
        """Run ``fn()`` on a worker; the future holds its result, its exception, or ``on_timeout(key, started)``
        once ``timeout`` seconds have passed (when ``expire`` is called after that; ``started``: whether the call
        was running by then, and so goes on running).  ``on_timeout`` runs under the pool's lock: it must not call
        back into the pool or wait on a lock held around ``submit``."""
        with self._cond:
            call = _Call(key, fn, (self._held_since or time.monotonic()) + self.timeout)
            self._queue.append(call)
            self._cond.notify()
        return call.future

    def next_deadline(self) -> float | None:
        """The earliest deadline (``time.monotonic()`` clock) of a call not answered yet (while held: as if the
        pool were released now)."""
        with self._cond:
            pending = [c.deadline for c in (*self._queue, *self._running) if not c.future.done()]
            shift = 0.0 if self._held_since is None else time.monotonic() - self._held_since
        return min(pending) + shift if pending else None

    def hold(self) -> None:
        """Stop the clocks of all calls, pending and future, until ``release``."""
        with self._cond:
            if self._held_since is None:
                self._held_since = time.monotonic()

    def release(self) -> None:
        with self._cond:
            if self._held_since is None:
                return
            shift = time.monotonic() - self._held_since
            self._held_since = None
            for call in (*self._queue, *self._running):
                call.deadline += shift

    def expire(self, now: float | None = None) -> None:
        """Answer every call past its deadline with its timeout error; replace the workers of running ones."""
        now = time.monotonic() if now is None else now
        with self._cond:
            if self._held_since is not None:
                return
            for call in [c for c in self._queue if c.deadline <= now]:
                self._queue.remove(call)
                call.future.set_exception(self._on_timeout(call.key, False))
            for call in self._running:
                if call.deadline > now or call.future.done():
                    continue
                call.future.set_exception(self._on_timeout(call.key, True))
                if self._abandoned < self._max_abandoned:
                    call.abandoned = True
                    self._abandoned += 1
                    self._start_worker()
                    logger.warning("%s: a call exceeded %g s; its thread is abandoned to finish it (%d abandoned "
                                   "calls still running) and a new worker replaces it", self._name, self.timeout,
                                   self._abandoned)
                else:
                    logger.warning("%s: a call exceeded %g s while %d abandoned calls are still running (the cap): "
                                   "its worker stays busy with it and queued calls wait", self._name, self.timeout,
                                   self._abandoned)

    def _start_worker(self) -> None:
        self._threads += 1
        threading.Thread(target=self._work, daemon=True, name=f"{self._name}-{self._threads}").start()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                call = self._queue.popleft()
                self._running.add(call)
            result, error = None, None
            try:
                result = call.fn()
            except BaseException as e:  # the call's failure is its caller's to see
                error = e
            with self._cond:
                self._running.discard(call)
                late = call.future.done()
                if not late:
                    if error is None:
                        call.future.set_result(result)
                    else:
                        call.future.set_exception(error)
                if call.abandoned:
                    self._abandoned -= 1
                    self._threads -= 1
            if late and self._on_late is not None:
                self._on_late(call.key, result, error)
            if call.abandoned:
                return  # its replacement already works in its place
