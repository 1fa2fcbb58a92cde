"""A watchdog for a loop that must keep making progress (``--watchdog-timeout``).

The loop calls ``beat()`` once per iteration and wraps the waits that are allowed to last (an idle scheduler blocked
on its socket until a request comes) in ``with watchdog.idle():``.  A daemon thread checks the time since the last
beat; when it passes the timeout outside an idle wait, the loop is stuck (a forward that never returns, a deadlock,
a collective whose peer died): the thread logs why and the stack of every thread of the process (what
``faulthandler`` would print, but through the logger, so that it lands in the log with the rest), calls ``on_timeout`` (the scheduler tells the front end)
and ends the process with ``EXIT_CODE``.  A supervisor (systemd, Kubernetes) then restarts the server.

A stuck loop cannot be unwound from another thread, hence ``os._exit``: nothing of the process is worth saving.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator

logger = logging.getLogger(__name__)

EXIT_CODE = 3  # distinct from an exception's 1, so the exit status alone says "watchdog"


class Watchdog:
    def __init__(self, timeout_s: float, what: str, on_timeout: Callable[[str], None] | None = None,
                 exit: Callable[[int], None] = os._exit) -> None:
        """``what`` names the loop in the log line; ``on_timeout(reason)`` runs (errors ignored) before ``exit``.
        Call ``start()`` when the loop starts."""
        if timeout_s <= 0:
            raise ValueError(f"the watchdog timeout must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self.what = what
        self.on_timeout = on_timeout
        self.exit = exit
        self._last = time.monotonic()
        self._idle = 0  # > 0 while inside idle(): the loop waits for work and may wait for good
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="radixlm-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self._last = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def beat(self) -> None:
        """The loop made progress."""
        self._last = time.monotonic()

    @contextlib.contextmanager
    def idle(self) -> Iterator[None]:
        """Around a wait for work: never a timeout inside it; leaving it counts as progress."""
        self._idle += 1
        try:
            yield
        finally:
            self._idle -= 1
            self._last = time.monotonic()

    def _watch(self) -> None:
        period = min(1.0, self.timeout_s / 4)
        while not self._stop.wait(period):
            stalled = time.monotonic() - self._last
            if self._idle or stalled <= self.timeout_s:
                continue
            reason = (f"watchdog: the {self.what} made no progress for {stalled:.1f} s "
                      f"(--watchdog-timeout {self.timeout_s:g})")
            logger.error("%s; exiting. The stacks of every thread:\n%s", reason, all_stacks())
            if self.on_timeout is not None:
                try:
                    self.on_timeout(reason)
                except Exception:  # the exit below matters more than the report
                    logger.exception("watchdog: reporting the timeout failed")
            self.exit(EXIT_CODE)
            return


def all_stacks() -> str:
    """The current stack of every thread of this process, innermost call last."""
    names = {t.ident: t.name for t in threading.enumerate()}
    return "\n".join(f"Thread {names.get(ident, '?')} ({ident}):\n" + "".join(traceback.format_stack(frame))
                     for ident, frame in sys._current_frames().items())


__all__ = ["EXIT_CODE", "Watchdog", "all_stacks"]
