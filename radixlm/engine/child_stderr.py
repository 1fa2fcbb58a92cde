"""The stderr of a child process (a scheduler; a ``--dp-size`` replica server), passed through to ours and
remembered, so that a process that dies before it reports ready (a traceback, an import error, multiprocessing
refusing to start it) explains itself in the exception the parent raises instead of only scrolling past on the
terminal."""

from __future__ import annotations

import os
import sys
import threading
from multiprocessing import resource_tracker
from multiprocessing.process import BaseProcess

TAIL_BYTES = 16384  # what is kept of the child's output
TAIL_LINES = 40  # what of it goes into an error message
DRAIN_TIMEOUT_S = 2.0  # a dead child's last output may still be in the pipe

# What multiprocessing's spawn prints when the main module, re-run in the child, starts a process itself.
_BOOTSTRAP_ERROR = "finished its bootstrapping phase"
_MAIN_GUARD_HINT = (
    "The scheduler process is started with multiprocessing's spawn method, which runs your main module again in "
    "the child; that script creates an Engine at import time, so the child tried to start one too.  Wrap the code "
    "that creates the Engine in `if __name__ == '__main__':`."
)


class OutputTail:
    """A pipe for a child's output (``write_fd``: give it to the child, then ``close_write_end``), and the thread
    that copies what comes through it to this process's stderr as it arrives, with ``prefix`` before every line,
    keeping the last ``TAIL_BYTES`` (without the prefix)."""

    def __init__(self, name: str, prefix: bytes = b"") -> None:
        self._tail = bytearray()
        self._lock = threading.Lock()
        self._prefix = prefix
        self._at_line_start = True
        read_fd, self.write_fd = os.pipe()
        self._pump = threading.Thread(target=self._copy, args=(read_fd, os.dup(2)), daemon=True,
                                      name=f"radixlm-stderr-{name}")
        self._pump.start()

    def close_write_end(self) -> None:
        """Once the child holds its own copy: the pump then sees the end when the child is gone."""
        os.close(self.write_fd)

    def tail(self) -> str:
        """The last lines the child wrote.  Call it once the child has exited: waits (up to ``DRAIN_TIMEOUT_S``)
        for its output to drain."""
        self._pump.join(DRAIN_TIMEOUT_S)
        with self._lock:
            text = self._tail.decode(errors="replace")
        return "\n".join(text.rstrip().splitlines()[-TAIL_LINES:])

    def _copy(self, read_fd: int, out_fd: int) -> None:
        try:
            while chunk := os.read(read_fd, 65536):
                with self._lock:
                    self._tail += chunk
                    del self._tail[:-TAIL_BYTES]
                _write_all(out_fd, self._prefixed(chunk))
        finally:
            os.close(read_fd)
            os.close(out_fd)

    def _prefixed(self, chunk: bytes) -> bytes:
        if not self._prefix:
            return chunk
        lines = chunk.split(b"\n")
        # the last piece is the start of an unfinished line (empty when the chunk ends a line)
        out = b"\n".join((self._prefix + line if (i or self._at_line_start) and line else line)
                         for i, line in enumerate(lines))
        self._at_line_start = chunk.endswith(b"\n")
        return out


class ChildStderr(OutputTail):
    """An ``OutputTail`` that a ``multiprocessing`` child inherits as its stderr."""

    def __init__(self, process: BaseProcess) -> None:
        """Start ``process`` (not started yet) with the pipe as its stderr.

        multiprocessing gives a spawned child this process's fd 2 and no way to choose another, so fd 2 points at
        the pipe while the child starts; whatever this process writes to stderr meanwhile comes through the pipe to
        the real stderr as well.
        """
        # The resource tracker is a process too: started inside the swap, it would hold the pipe open for good.
        resource_tracker.ensure_running()
        super().__init__(process.name)
        saved_fd = os.dup(2)
        sys.stderr.flush()
        try:
            os.dup2(self.write_fd, 2)
            process.start()
        finally:
            sys.stderr.flush()
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
            self.close_write_end()


def _write_all(fd: int, data: bytes) -> None:
    """Write ``data`` to ``fd``; if our stderr is gone, drop it (the child must never block on a full pipe)."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        pass


def early_exit_message(what: str, exitcode: int | None, output: str) -> str:
    """Why the child ``what`` exited with ``exitcode`` before it was ready: its last ``output``, and the fix when
    the cause is a known one."""
    message = f"{what} exited with code {exitcode} while loading the model."
    if _BOOTSTRAP_ERROR in output:
        message += "  " + _MAIN_GUARD_HINT
    if not output:
        return message + "  It wrote nothing to stderr."
    return message + "\nIts last output:\n" + "\n".join("    " + line for line in output.splitlines())
