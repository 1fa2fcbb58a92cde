"""Fault isolation (live server): one request's failure -- a grammar that cannot match anything, chat-template
arguments the tokenizer rejects, a client that stops reading its stream -- never changes the output of the
requests running next to it, never stalls them, and leaves the server idle with its KV cache free.

Each test runs a batch of greedy neighbours concurrently with the faulty request and compares every neighbour's
output ids with what the same request gets alone (exactly: the engine is batch-invariant).  Timeouts are bounds
that detect a hang, not measurements.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
from server_harness import LiveServer

NEIGHBOURS = ["The capital of France is", "Water boils at", "A haiku about the sea:", "def fibonacci(n):"]
NEIGHBOUR_PARAMS = {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True}
HANG_TIMEOUT_S = 180  # a neighbour taking longer than this is stalled (it takes seconds on a loaded CPU)
IDLE_TIMEOUT_S = 60
UNSATISFIABLE = "root ::= a\na ::= a"  # parses, but no text matches it


@pytest.fixture(scope="module")
def server():
    s = LiveServer("--max-total-tokens", "8192")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def alone(server) -> list[list[int]]:
    """Each neighbour's output ids, run alone."""
    outs = []
    for prompt in NEIGHBOURS:
        status, out = server.request("POST", "/generate", {"text": prompt, "sampling_params": NEIGHBOUR_PARAMS},
                                     timeout=HANG_TIMEOUT_S)
        assert status == 200, out
        outs.append(out["output_ids"])
    return outs


def with_neighbours(server, alone: list[list[int]], fault: Callable[[], Any]) -> Any:
    """Run ``fault`` while the neighbours run; assert they are unchanged and the server idle afterwards; return
    what ``fault`` returned."""
    def neighbour(prompt: str) -> list[int]:
        status, out = server.request("POST", "/generate", {"text": prompt, "sampling_params": NEIGHBOUR_PARAMS},
                                     timeout=HANG_TIMEOUT_S)
        assert status == 200, out
        return out["output_ids"]

    with concurrent.futures.ThreadPoolExecutor(len(NEIGHBOURS) + 1) as pool:
        neighbours = [pool.submit(neighbour, p) for p in NEIGHBOURS]
        faulty = pool.submit(fault)
        outs = [f.result(timeout=HANG_TIMEOUT_S) for f in neighbours]
        result = faulty.result(timeout=HANG_TIMEOUT_S)
    assert outs == alone
    assert_idle(server)
    return result


def assert_idle(server) -> None:
    """Nothing left running or tracked, every KV slot free or cached (bounded wait: aborts land asynchronously)."""
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while True:
        info = server.server_info()
        state = info["internal_states"][0]
        left = (state["num_running_reqs"], state["num_waiting_reqs"], state["num_grammar_queue_reqs"],
                state["num_tracked_reqs"], info["num_frontend_reqs"])
        kv_free = state["available_kv_tokens"] + state["cached_kv_tokens"] == state["max_total_num_tokens"]
        if not any(left) and kv_free:
            break
        assert time.monotonic() < deadline, f"not idle after {IDLE_TIMEOUT_S} s: {left}, {state}"
        time.sleep(0.2)
    assert server.request("GET", "/health")[0] == 200


# ---------------------------------------------------------------------------------------------------- grammars
def test_unsatisfiable_grammar_fails_alone(server, alone):
    """A grammar that parses but matches nothing passes the front end's check and fails when the scheduler
    compiles it: a 400 naming the problem, like any grammar the scheduler rejects (before, the request sampled
    from an all -inf distribution)."""
    def fault() -> dict:
        status, out = server.request("POST", "/generate", {
            "text": "Hi", "sampling_params": {"ebnf": UNSATISFIABLE, "max_new_tokens": 8, "temperature": 0.7},
            "return_logprob": True, "top_logprobs_num": 3}, timeout=HANG_TIMEOUT_S)
        assert status == 400, out
        return out

    out = with_neighbours(server, alone, fault)
    assert "matches no text" in out["error"]["message"] and out["error"]["param"] == "ebnf", out


def test_unsatisfiable_grammar_through_the_openai_api(server):
    status, out = server.request("POST", "/v1/completions", {"model": "m", "prompt": "Hi", "max_tokens": 4,
                                                              "ebnf": UNSATISFIABLE})
    assert status == 400, out
    assert "matches no text" in out["error"]["message"] and out["error"]["param"] == "ebnf", out


def test_top_logprobs_of_a_constrained_request(server, alone):
    """A grammar leaves fewer possible tokens than top_logprobs asks for: the forbidden ones (logprob -inf, which
    JSON cannot carry; this was a 500) are left out of the alternatives."""
    def fault() -> dict:
        status, out = server.request("POST", "/v1/chat/completions", {
            "model": "m", "messages": [{"role": "user", "content": "Is the sky blue?"}], "max_tokens": 8,
            "temperature": 0, "logprobs": True, "top_logprobs": 20, "regex": "(yes|no)"}, timeout=HANG_TIMEOUT_S)
        assert status == 200, out
        return out

    out = with_neighbours(server, alone, fault)
    choice = out["choices"][0]
    assert choice["message"]["content"] in ("yes", "no")
    first = choice["logprobs"]["content"][0]
    alternatives = [alt["token"] for alt in first["top_logprobs"]]
    assert alternatives and all("yes".startswith(t) or "no".startswith(t) for t in alternatives), alternatives
    assert all(alt["logprob"] > -1e4 for alt in first["top_logprobs"])
    assert first["token"] in [alt["token"] for alt in first["top_logprobs"]]


# ---------------------------------------------------------------------------------------------------- tokenizer
@pytest.mark.parametrize("kwargs", [{"continue_final_message": True}, {"return_assistant_tokens_mask": True}])
def test_chat_template_arguments_the_tokenizer_rejects(server, alone, kwargs):
    """transformers raises ValueError for these chat_template_kwargs combinations: the request's mistake, a 400
    naming the template (was a 500)."""
    def fault() -> tuple[int, Any]:
        return server.request("POST", "/v1/chat/completions", {
            "model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
            "chat_template_kwargs": kwargs}, timeout=HANG_TIMEOUT_S)

    status, body = with_neighbours(server, alone, fault)
    assert status == 400, body
    assert body["error"]["param"] == "messages" and "chat template" in body["error"]["message"]


# ---------------------------------------------------------------------------------------------------- streams
def open_unread_stream(server) -> socket.socket:
    """A streaming request with big chunks (20 top logprobs each) from a client with a tiny receive buffer that
    reads nothing but the first byte: the server's writes to it back up while it keeps generating.  Long enough
    to be still running when the caller looks (160 tokens could finish first on an idle machine); closing the
    socket aborts it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "Write a long story."}],
                       "max_tokens": 1024, "ignore_eos": True, "temperature": 0, "stream": True, "logprobs": True,
                       "top_logprobs": 20}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    sock.settimeout(HANG_TIMEOUT_S)
    assert sock.recv(1, socket.MSG_PEEK)  # the response has started: the request is running
    return sock


def test_client_that_stops_reading_a_stream(server, alone):
    sock = open_unread_stream(server)
    try:
        assert server.server_info()["internal_states"][0]["num_running_reqs"] >= 1
        # The neighbours finish, unchanged, while the stalled stream's connection stays open and unread.
        with concurrent.futures.ThreadPoolExecutor(len(NEIGHBOURS)) as pool:
            outs = list(pool.map(lambda p: server.request(
                "POST", "/generate", {"text": p, "sampling_params": NEIGHBOUR_PARAMS}, timeout=HANG_TIMEOUT_S),
                NEIGHBOURS))
        assert all(status == 200 for status, _ in outs), outs
        assert [out["output_ids"] for _, out in outs] == alone
        assert server.request("GET", "/health", timeout=30)[0] == 200
    finally:
        sock.close()
    assert_idle(server)  # closing the connection releases whatever the stalled stream still held


# ---------------------------------------------------------------------------------------------------- front end
def exited(pid: int) -> bool:
    """Gone, or a zombie (a container's init may not reap the orphans it adopts)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.split()[1] == "Z" for line in f if line.startswith("State:"))
    except FileNotFoundError:
        return True


def test_scheduler_exits_when_the_front_end_is_killed_mid_stream():
    """SIGKILL of the server while a request streams: its scheduler notices the orphaning and exits.  (Its last
    outputs, queued for the dead front end, used to block zmq's context termination forever -- a 2 GB process
    left behind.)"""
    s = LiveServer("--max-total-tokens", "4096")
    try:
        pids = s.server_info()["scheduler_pids"]
        sock = socket.create_connection(("127.0.0.1", s.port))
        body = json.dumps({"text": "Once upon a time", "stream": True,
                           "sampling_params": {"max_new_tokens": 256, "ignore_eos": True}}).encode()
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        sock.settimeout(HANG_TIMEOUT_S)
        assert sock.recv(1, socket.MSG_PEEK)  # streaming: the scheduler is sending outputs
        s.proc.kill()
        s.proc.wait()
        sock.close()
        deadline = time.monotonic() + IDLE_TIMEOUT_S
        while not all(exited(pid) for pid in pids):
            assert time.monotonic() < deadline, f"scheduler {pids} still alive {IDLE_TIMEOUT_S} s after its parent died"
            time.sleep(0.2)
    finally:
        for pid in pids if "pids" in locals() else []:
            if not exited(pid):
                os.kill(pid, signal.SIGKILL)
        s.stop()
