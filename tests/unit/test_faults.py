"""The test hooks of the reliability work: injected faults (``RADIXLM_FAULTS``) and the scheduler's watchdog."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time

import pytest

from radixlm.utils.faults import ENV_VAR, Fault, Faults, InjectedFault
from radixlm.utils.watchdog import EXIT_CODE, Watchdog, all_stacks


def test_spec_parses_sites_actions_and_rid_prefixes() -> None:
    faults = Faults(" scheduler.step=hang@slow- , detokenizer=raise ")
    assert faults.faults == [Fault("scheduler.step", "hang", "slow-"), Fault("detokenizer", "raise", "")]


@pytest.mark.parametrize("spec", ["scheduler.step", "scheduler.step=explode", "tokenizer=raise", "=raise"])
def test_a_malformed_spec_is_refused(spec: str) -> None:
    with pytest.raises(ValueError, match=ENV_VAR):
        Faults(spec)


def test_a_fault_fires_only_for_its_site_and_matching_requests() -> None:
    faults = Faults("detokenizer=raise@bad-")
    faults.fire("detokenizer", ["good-1", "other"])  # no match: nothing happens
    faults.fire("scheduler.step", ["bad-1"])  # another site
    faults.fire("detokenizer", [])  # no request at the site
    with pytest.raises(InjectedFault, match="detokenizer"):
        faults.fire("detokenizer", ["good-1", "bad-7"])
    with pytest.raises(InjectedFault):  # without a prefix: any request
        Faults("scheduler.step=raise").fire("scheduler.step", ["x"])


def test_unset_means_no_faults_and_the_variable_is_read_at_import() -> None:
    code = "from radixlm.utils import faults; print(faults.ACTIVE is None)"
    env = {"PATH": "", "PYTHONPATH": ":".join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
    code = "from radixlm.utils import faults; print(faults.ACTIVE.faults)"
    out = subprocess.run([sys.executable, "-c", code], env={**env, ENV_VAR: "detokenizer=hang@a"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[Fault(site='detokenizer', action='hang', rid_prefix='a')]"


def _watched(timeout_s: float) -> tuple[Watchdog, dict, threading.Event]:
    box: dict = {}
    fired = threading.Event()

    def exit(code: int) -> None:
        box["code"] = code
        fired.set()

    def on_timeout(reason: str) -> None:
        box["reason"] = reason

    return Watchdog(timeout_s, "test loop", on_timeout=on_timeout, exit=exit), box, fired


def test_watchdog_fires_on_a_stalled_loop_with_the_stacks_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    dog, box, fired = _watched(0.2)
    with caplog.at_level(logging.ERROR, logger="radixlm.utils.watchdog"):
        dog.start()
        assert fired.wait(10), "the watchdog never fired"
    assert box["code"] == EXIT_CODE and "test loop made no progress" in box["reason"]
    assert "--watchdog-timeout 0.2" in box["reason"]
    # every thread's stack, this test's own frame included
    assert "Thread MainThread" in caplog.text and "test_watchdog_fires_on_a_stalled_loop" in caplog.text


def test_watchdog_spares_a_loop_that_beats_or_waits_idle() -> None:
    dog, box, fired = _watched(0.3)
    dog.start()
    deadline = time.monotonic() + 1.2
    while time.monotonic() < deadline:  # a busy loop that keeps beating
        dog.beat()
        time.sleep(0.02)
    with dog.idle():  # an idle wait four times the timeout
        time.sleep(1.2)
    dog.beat()
    dog.stop()
    assert not fired.is_set(), box


def test_all_stacks_names_every_thread() -> None:
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, name="sleeper-xyz")
    t.start()
    try:
        text = all_stacks()
    finally:
        stop.set()
        t.join()
    assert "Thread sleeper-xyz" in text and "Thread MainThread" in text
