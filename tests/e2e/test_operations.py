"""Operating a live server: engine failures (an injected scheduler exception, an injected hang caught by the
watchdog, a killed scheduler) answered 500/503 and ended by a non-zero exit, the SIGTERM drain, the queue limit,
the request body limit and a detokenizer failure that fails only its own request.  Faults are injected with
``RADIXLM_FAULTS`` (``radixlm/utils/faults.py``)."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import openai
import pytest

from server_harness import LiveServer

EXIT_WITHIN_S = 30  # bound on the time from an engine failure or a drain's end to the process's exit
LONG = {"temperature": 0, "ignore_eos": True}


def start(*flags: str, faults: str | None = None) -> LiveServer:
    with pytest.MonkeyPatch.context() as mp:
        if faults:
            mp.setenv("RADIXLM_FAULTS", faults)
        return LiveServer("--max-total-tokens", "4096", *flags)


def call(server: LiveServer, path: str, body: Any, timeout: float = 120) -> tuple[int, dict[str, str], Any]:
    """(status, headers with lower-case names, parsed body); a streaming answer's body is its list of SSE data
    payloads."""
    req = urllib.request.Request(server.base + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, headers, text = resp.status, resp.headers, resp.read().decode()
    except urllib.error.HTTPError as e:
        status, headers, text = e.code, e.headers, e.read().decode()
    headers = {k.lower(): v for k, v in headers.items()}
    if headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
        return status, headers, [e if e == "[DONE]" else json.loads(e) for e in events]
    return status, headers, json.loads(text)


def in_background(fn, *args) -> tuple[threading.Thread, dict]:
    box: dict = {}
    t = threading.Thread(target=lambda: box.setdefault("out", fn(*args)), daemon=True)
    t.start()
    return t, box


def wait_running(server: LiveServer, count: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while server.server_info()["internal_states"][0]["num_running_reqs"] < count:
        assert time.time() < deadline, "the requests never started"
        time.sleep(0.05)


def hold_a_request_open(server: LiveServer) -> socket.socket:
    """A request in flight for as long as the socket stays open (its body never completes): the server waits for
    the in-flight responses before it exits, so this keeps it up while the test looks at it."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"prompt\": ")
    return sock


def wait_exit(server: LiveServer) -> int:
    server.proc.wait(timeout=EXIT_WITHIN_S)
    return server.proc.returncode


def assert_stream_failed(events: list, needle: str) -> None:
    assert events[-1] == "[DONE]", events[-3:]
    err = events[-2]["error"]
    assert err["code"] == 500 and err["type"] == "internal_server_error" and needle in err["message"], err


# ---------------------------------------------------------------------------------------------------- engine failures
def test_a_scheduler_exception_is_500_for_requests_in_flight_then_503_then_a_non_zero_exit():
    # A pool that admits both long requests at once: with 4096 tokens the second waits until decoding has decayed
    # the first one's reservation (~190 steps), longer than wait_running allows on a slow machine.
    s = start("--max-total-tokens", "16384", faults="scheduler.step=raise@crash-")
    try:
        assert call(s, "/generate", {"text": "Hi", "sampling_params": {"max_new_tokens": 2}})[0] == 200
        streaming, sbox = in_background(call, s, "/v1/completions", {
            "prompt": "Count:", "max_tokens": 4000, "stream": True, **LONG})
        plain, pbox = in_background(call, s, "/generate", {
            "text": "Count:", "sampling_params": {"max_new_tokens": 4000, **LONG}})
        wait_running(s, 2)
        held = hold_a_request_open(s)
        status, _, out = call(s, "/generate", {"text": "Hi", "rid": "crash-1"})
        assert status == 500 and out["error"]["type"] == "internal_server_error", out
        assert "internal error in the scheduler: InjectedFault" in out["error"]["message"], out
        streaming.join(30)
        plain.join(30)
        status, _, events = sbox["out"]
        assert status == 200
        assert_stream_failed(events, "InjectedFault")
        status, _, out = pbox["out"]
        assert status == 500 and "InjectedFault" in out["error"]["message"], out
        # dead: new requests and the health check are 503 (no Retry-After: only a restart helps)
        status, headers, out = call(s, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        assert status == 503 and out["error"]["type"] == "service_unavailable" and "retry-after" not in headers
        assert s.request("GET", "/health")[0] == 503
        held.close()
        assert wait_exit(s) == 1
        log = s.proc.stdout.read()
        assert "Traceback" in log and "InjectedFault: injected fault at scheduler.step" in log
    finally:
        s.stop()


def test_a_hung_step_trips_the_watchdog_which_logs_every_stack_and_the_server_exits():
    s = start("--watchdog-timeout", "4", faults="scheduler.step=hang@hang-")
    try:
        time.sleep(5)  # idle for longer than the timeout: an idle scheduler never trips it
        assert call(s, "/generate", {"text": "Hi", "sampling_params": {"max_new_tokens": 2}})[0] == 200
        status, _, out = call(s, "/generate", {"text": "Hi", "rid": "hang-1"}, timeout=60)
        assert status == 500 and "watchdog" in out["error"]["message"] and "no progress" in out["error"]["message"]
        assert wait_exit(s) == 1
        log = s.proc.stdout.read()
        assert "--watchdog-timeout 4" in log
        assert "Thread MainThread" in log and "in fire" in log  # the hung thread's stack, down to the hang
    finally:
        s.stop()


def test_a_killed_scheduler_is_500_in_flight_then_503_then_a_non_zero_exit():
    s = start()
    try:
        pid = s.server_info()["scheduler_pids"][0]
        plain, box = in_background(call, s, "/v1/completions", {"prompt": "Count:", "max_tokens": 4000, **LONG})
        wait_running(s, 1)
        held = hold_a_request_open(s)
        os.kill(pid, signal.SIGKILL)
        plain.join(30)
        status, _, out = box["out"]
        assert status == 500 and "exit code -9" in out["error"]["message"], out
        status, _, out = call(s, "/v1/completions", {"prompt": "Hi", "max_tokens": 2}, timeout=30)
        assert status == 503 and "scheduler" in out["error"]["message"]
        held.close()
        assert wait_exit(s) == 1
    finally:
        s.stop()


# ---------------------------------------------------------------------------------------------------- drain
def test_sigterm_drains_in_flight_requests_refuses_new_ones_and_exits_0():
    s = start()
    try:
        client = openai.OpenAI(base_url=s.base + "/v1", api_key="unused", max_retries=0, timeout=120)
        alone = client.completions.create(model="m", prompt="Count:", max_tokens=48, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].text
        streaming, sbox = in_background(call, s, "/v1/completions", {
            "prompt": "Count:", "max_tokens": 48, "stream": True, **LONG})
        plain, pbox = in_background(call, s, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "Count to fifty."}], "max_tokens": 48, **LONG})
        wait_running(s, 2)
        s.proc.send_signal(signal.SIGTERM)
        deadline = time.time() + 10
        while s.request("GET", "/health")[0] != 503:  # the signal lands asynchronously
            assert time.time() < deadline
            time.sleep(0.05)
        status, headers, out = call(s, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        assert status == 503 and headers.get("retry-after") == "1" and "shutting down" in out["error"]["message"]
        assert out["error"]["type"] == "service_unavailable"
        streaming.join(60)
        plain.join(60)
        status, _, events = sbox["out"]
        assert status == 200 and events[-1] == "[DONE]"
        assert "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"]) == alone
        assert [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"]][-1] == "length"
        status, _, out = pbox["out"]
        assert status == 200 and out["choices"][0]["finish_reason"] == "length"
        assert out["usage"]["completion_tokens"] == 48
        assert wait_exit(s) == 0
    finally:
        s.stop()


# ---------------------------------------------------------------------------------------------------- limits
@pytest.fixture(scope="module")
def limited():
    """Small limits, a detokenizer fault for rids starting with 'bad-', a short grace period (the last test drains
    it)."""
    s = start("--max-running-requests", "2", "--max-queued-requests", "3", "--max-request-body-bytes", "65536",
              "--graceful-shutdown-timeout", "1", faults="detokenizer=raise@bad-")
    yield s
    s.stop()


def _wait_idle_and_free(server: LiveServer) -> None:
    deadline = time.time() + 30
    while True:
        state = server.server_info()["internal_states"][0]
        if state["num_running_reqs"] == 0 and state["num_waiting_reqs"] == 0:
            break
        assert time.time() < deadline, state
        time.sleep(0.1)
    assert state["available_kv_tokens"] + state["cached_kv_tokens"] == state["max_total_num_tokens"], state


def test_a_flood_beyond_max_queued_requests_gets_503_with_retry_after_and_the_rest_completes(limited):
    prompts = ["The capital of France is", "Water boils at", "Once upon a time", "Roses are red,"]
    alone = {p: call(limited, "/v1/completions", {"prompt": p, "max_tokens": 8, **LONG})[2]["choices"][0]["text"]
             for p in prompts}
    barrier = threading.Barrier(16)

    def one(i: int) -> tuple[int, dict, Any]:
        barrier.wait()
        return call(limited, "/v1/completions", {"prompt": prompts[i % 4], "max_tokens": 8, **LONG})

    threads = [in_background(one, i) for i in range(16)]
    for t, _ in threads:
        t.join(120)
    results = [box["out"] for _, box in threads]
    refused = [r for r in results if r[0] == 503]
    served = [(i, r) for i, r in enumerate(results) if r[0] == 200]
    assert refused and served and len(refused) + len(served) == 16, [r[0] for r in results]
    for status, headers, out in refused:
        assert headers.get("retry-after") == "1" and out["error"]["type"] == "service_unavailable"
        assert "--max-queued-requests 3" in out["error"]["message"]
    for i, (_, _, out) in served:
        assert out["choices"][0]["text"] == alone[prompts[i % 4]]
    # a request that alone asks for more than the queue holds can never be admitted: the client's mistake
    status, _, out = call(limited, "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "n": 4})
    assert status == 400 and out["error"]["param"] == "n"
    _wait_idle_and_free(limited)


def test_a_detokenizer_exception_fails_only_its_own_request(limited):
    good = {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 12, **LONG}}
    alone = call(limited, "/generate", good)[2]["text"]
    bad, bbox = in_background(call, limited, "/generate", {**good, "rid": "bad-1"})
    bad_stream, sbox = in_background(call, limited, "/generate", {**good, "rid": "bad-2", "stream": True})
    ok, obox = in_background(call, limited, "/generate", good)
    for t in (bad, bad_stream, ok):
        t.join(60)
    status, _, out = bbox["out"]
    assert status == 500 and "InjectedFault" in out["error"]["message"], out
    assert_stream_failed(sbox["out"][2], "InjectedFault")
    assert obox["out"][0] == 200 and obox["out"][2]["text"] == alone
    _wait_idle_and_free(limited)
    assert call(limited, "/generate", good)[2]["text"] == alone


def test_a_body_over_the_limit_is_413_announced_or_chunked(limited):
    big = {"prompt": "x" * 70000, "max_tokens": 1}
    status, _, out = call(limited, "/v1/completions", big)
    assert status == 413 and out["error"]["code"] == 413 and "65536" in out["error"]["message"]
    # chunked upload: no Content-Length, refused once the chunks pass the limit
    sock = socket.create_connection(("127.0.0.1", limited.port))
    sock.settimeout(30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"x" * 8192
    try:
        for _ in range(12):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    except OSError:
        pass  # the server may answer and close before the upload ends
    answer = b""
    while b"\r\n\r\n" not in answer:
        data = sock.recv(65536)
        if not data:
            break
        answer += data
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert limited.request("GET", "/health")[0] == 200


def test_a_grace_period_that_expires_aborts_what_is_left_and_exits_0(limited):
    """The last test of the module: it drains the shared server."""
    streaming, sbox = in_background(call, limited, "/v1/completions", {
        "prompt": "Count:", "max_tokens": 3000, "stream": True, **LONG})
    plain, pbox = in_background(call, limited, "/generate", {
        "text": "Count:", "sampling_params": {"max_new_tokens": 3000, **LONG}})
    wait_running(limited, 2)
    limited.proc.send_signal(signal.SIGTERM)
    streaming.join(60)
    plain.join(60)
    status, _, events = sbox["out"]
    assert status == 200 and events[-1] == "[DONE]"
    assert [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"]][-1] == "abort"
    status, _, out = pbox["out"]
    assert status == 200 and out["meta_info"]["finish_reason"]["type"] == "abort"
    assert 0 < out["meta_info"]["completion_tokens"] < 3000
    assert wait_exit(limited) == 0
