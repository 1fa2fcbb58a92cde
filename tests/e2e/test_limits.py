"""Request limits and conformance through a live server: the HTTP mapping of checks the unit tests cover one by one
(tests/unit/test_server_errors.py, test_sampling.py, test_detokenizer.py, test_compile_pool.py), stop_regex, and
the grammar compile timeout under load from other requests."""

from __future__ import annotations

import json
import threading
import urllib.request
from typing import Any

import pytest

from tests.e2e.server_harness import LiveServer

CONTEXT = 256
TIMEOUT_S = 2
# Compiles for far longer than TIMEOUT_S (``(.{0,60}){0,60}`` alone takes about a second).
PATHOLOGICAL = "(.{0,300}){0,300}"
COUNT = "Count: 1, 2, 3, 4,"  # greedy: " 5, 6, 7, 8, 9, 10, 11, ..."


@pytest.fixture(scope="module")
def server():
    s = LiveServer("--context-length", str(CONTEXT), "--grammar-compile-timeout", str(TIMEOUT_S))
    yield s
    s.stop()


def generate(server: LiveServer, sampling_params: dict[str, Any], text: str = COUNT, **extra: Any):
    return server.request("POST", "/generate", {"text": text, "sampling_params": {"temperature": 0, **sampling_params},
                                                **extra})


def sse_events(server: LiveServer, path: str, body: dict[str, Any]) -> tuple[int, list[Any]]:
    req = urllib.request.Request(server.base + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        lines = [line.decode().strip() for line in resp]
        status = resp.status
    data = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    return status, [d if d == "[DONE]" else json.loads(d) for d in data]


def test_invalid_grammar_found_by_the_scheduler_is_a_400(server: LiveServer) -> None:
    """An EBNF that parses but fails to compile against the vocabulary reaches the client the same way."""
    status, out = generate(server, {"max_new_tokens": 4, "ebnf": 'root ::= "a" | undefined_rule'})
    assert status == 400 and out["error"]["param"] == "ebnf", out


def test_stop_regex(server: LiveServer) -> None:
    """Native and OpenAI: generation stops once the text matches, the match stays in the text, matched_stop is
    the pattern; streaming gives the same text."""
    status, out = generate(server, {"max_new_tokens": 24, "stop_regex": [r"x{5}", r"\d+, 7"]})
    assert status == 200 and out["text"] == " 5, 6, 7", out
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": r"\d+, 7"}
    status, out = server.request("POST", "/v1/completions", {"prompt": COUNT, "max_tokens": 24, "temperature": 0,
                                                             "stop_regex": r"\d+, 7"})
    choice = out["choices"][0]
    assert (choice["text"], choice["finish_reason"], choice["matched_stop"]) == (" 5, 6, 7", "stop", r"\d+, 7")
    status, events = sse_events(server, "/v1/completions", {"prompt": COUNT, "max_tokens": 24, "temperature": 0,
                                                            "stop_regex": r"\d+, 7", "stream": True})
    chunks = [e for e in events if e != "[DONE]"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == " 5, 6, 7"
    assert chunks[-1]["choices"][0]["matched_stop"] == r"\d+, 7"
    status, out = generate(server, {"stop_regex": r"\d(?=,)"})  # lookahead: the text ahead is unknown
    assert status == 400 and out["error"]["param"] == "stop_regex", out


def test_context_limits(server: LiveServer) -> None:
    """An explicit max_tokens that cannot fit is a 400 in the wording clients parse; a default one is lowered to
    fit (the request runs to the context's end); stop_token_ids beyond the vocabulary are accepted."""
    prompt = "word " * 252
    status, out = server.request("POST", "/v1/completions", {"prompt": prompt, "max_tokens": 100})
    assert status == 400 and out["error"]["param"] == "max_tokens", out
    assert out["error"]["message"].startswith(f"This model's maximum context length is {CONTEXT} tokens. However, "
                                              "you requested ")
    status, out = generate(server, {"stop_token_ids": [10**6]}, text=prompt)
    assert status == 200 and out["meta_info"]["finish_reason"]["type"] == "length", out
    assert out["meta_info"]["prompt_tokens"] + out["meta_info"]["completion_tokens"] == CONTEXT
    status, out = generate(server, {}, text="x" * (CONTEXT * 100))
    assert status == 400 and "characters" in out["error"]["message"], out


def test_unknown_openai_fields_are_accepted(server: LiveServer) -> None:
    status, out = server.request("POST", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "vendor_extra": {"x": 1}})
    assert status == 200, out


# Last in the module: its abandoned compilation burns a core until the server stops.
def test_pathological_grammar_times_out_while_other_requests_complete(server: LiveServer) -> None:
    """The regex's compilation is abandoned after TIMEOUT_S: its request gets a 400 saying so; a plain request and
    another grammar request sent at the same time finish normally, and the same grammar again fails at once on
    every route (a 400, or in a stream that already started, an error event)."""
    results: dict[str, Any] = {}

    def send(name: str, params: dict[str, Any]) -> None:
        results[name] = generate(server, {"max_new_tokens": 8, **params})

    threads = [threading.Thread(target=send, args=args) for args in (
        ("slow", {"regex": PATHOLOGICAL}), ("plain", {}), ("grammar", {"regex": "[0-9]{3}"}))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    status, out = results["slow"]
    assert status == 400, out
    assert out["error"] == {"message": f"grammar compilation exceeded {TIMEOUT_S} s (--grammar-compile-timeout): "
                                       "simplify the regex", "type": "invalid_request_error", "param": "regex",
                            "code": 400}
    status, plain = results["plain"]
    assert status == 200 and plain["text"] == " 5, 6, 7" and plain["meta_info"]["finish_reason"]["type"] == "length"
    status, out = results["grammar"]
    assert status == 200 and len(out["text"]) == 3 and out["text"].isdigit(), out

    status, out = server.request("POST", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "regex": PATHOLOGICAL, "max_tokens": 4})
    assert status == 400 and out["error"]["param"] == "regex" and "exceeded" in out["error"]["message"], out
    status, events = sse_events(server, "/generate", {"text": "hi", "stream": True,
                                                      "sampling_params": {"regex": PATHOLOGICAL}})
    assert status == 200 and events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == 400 and "exceeded" in events[-2]["error"]["message"], events
    status, events = sse_events(server, "/v1/completions", {"prompt": "hi", "stream": True, "regex": PATHOLOGICAL})
    assert events[-2]["error"]["param"] == "regex" and events[-1] == "[DONE]", events
    assert server.server_info()["internal_states"][0]["num_grammar_queue_reqs"] == 0
