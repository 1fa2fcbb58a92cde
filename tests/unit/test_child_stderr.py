"""ChildStderr: a spawned child's stderr reaches ours and its tail is kept for the parent's error message."""

from __future__ import annotations

import multiprocessing as mp
import sys

import pytest

from radixlm.engine.child_stderr import ChildStderr, early_exit_message


def test_child_output_is_forwarded_and_kept(capfd: pytest.CaptureFixture[str]) -> None:
    """A child that dies early (sys.exit with a message: printed to its stderr, exit code 1): the message reaches
    this process's stderr and the tail; fd 2 is ours again afterwards."""
    proc = mp.get_context("spawn").Process(target=sys.exit, args=("boom: the child could not start",))
    stderr = ChildStderr(proc)
    proc.join(60)
    assert proc.exitcode == 1
    assert stderr.tail() == "boom: the child could not start"
    print("parent line", file=sys.stderr, flush=True)
    assert capfd.readouterr().err == "boom: the child could not start\nparent line\n"


def test_early_exit_message() -> None:
    """The child's output is quoted; multiprocessing's bootstrapping error adds the `__main__` guard fix first."""
    plain = early_exit_message("worker", 1, "Traceback (most recent call last):\nImportError: no module x")
    assert plain == ("worker exited with code 1 while loading the model.\nIts last output:\n"
                     "    Traceback (most recent call last):\n    ImportError: no module x")
    assert early_exit_message("worker", -9, "") == \
        "worker exited with code -9 while loading the model.  It wrote nothing to stderr."
    bootstrap = early_exit_message("worker", 1, "RuntimeError:\n  An attempt has been made to start a new process "
                                                "before the\n  current process has finished its bootstrapping phase.")
    assert "if __name__ == '__main__':" in bootstrap.splitlines()[0]
