"""The HTTP server's error mapping, in process around a stub engine (no scheduler, no model): a request the caller
got wrong is a 400 naming the field, any other exception a 500 that leaves the server serving."""

from __future__ import annotations

import asyncio
import json
import logging
from types import SimpleNamespace
from typing import Any

import pytest

from radixlm.server.app import create_app
from stub_engine import VOCAB, StubEngine, StubTokenizer



def request(app: Any, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """(status, JSON body) of one request sent straight to the ASGI app."""
    messages: list[dict[str, Any]] = []

    async def run() -> None:
        pending = [{"type": "http.request", "body": json.dumps(body).encode() if body is not None else b"",
                    "more_body": False}]

        async def receive() -> dict[str, Any]:
            if pending:
                return pending.pop()
            await asyncio.Event().wait()  # the client stays connected
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            messages.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                 "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1),
                 "server": ("127.0.0.1", 80)}
        await app(scope, receive, send)

    asyncio.run(run())
    status = next(m["status"] for m in messages if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return status, json.loads(payload)


@pytest.fixture
def engine() -> StubEngine:
    return StubEngine()


@pytest.fixture
def app(engine: StubEngine) -> Any:
    return create_app(engine)  # type: ignore[arg-type]


def test_internal_error_is_500_and_the_server_keeps_serving(engine: StubEngine, app: Any,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """A plain ValueError or RuntimeError inside a route is a bug, not the client's mistake: 500 with OpenAI's error
    shape, the traceback in the server log, and the next requests are answered."""

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("internal invariant broken\nsecond line stays in the log")

    engine.prepare = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="radixlm.server.app"):
        status, out = request(app, "POST", "/generate", {"input_ids": [1, 2, 3]})
    assert status == 500
    assert out == {"error": {"message": "internal server error: ValueError: internal invariant broken",
                             "type": "internal_server_error", "param": None, "code": 500}}
    assert "Traceback" in caplog.text and "second line stays in the log" in caplog.text

    crashing = SimpleNamespace(decode=lambda ids: (_ for _ in ()).throw(RuntimeError("decoder crashed")))
    engine.tokenizer = engine.validator.tokenizer = crashing
    status, out = request(app, "POST", "/v1/detokenize", {"tokens": [1, 2]})
    assert status == 500 and out["error"]["message"] == "internal server error: RuntimeError: decoder crashed"

    assert request(app, "GET", "/v1/models")[0] == 200
    engine.tokenizer = engine.validator.tokenizer = StubTokenizer()
    assert request(app, "POST", "/v1/detokenize", {"tokens": [72, 73]}) == (200, {"text": "HI"})


@pytest.mark.parametrize(("path", "body", "param", "needle"), [
    ("/generate", {"input_ids": [1, 2], "sampling_params": {"temperature": -1}}, "temperature", "temperature"),
    ("/generate", {"input_ids": [1, 2], "sampling_params": {"temperature": "hot"}}, "temperature", "a number"),
    ("/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_token": 3}}, "max_new_token", "unknown"),
    ("/generate", {"text": "x" * 65}, "text", "the prompt has 65 characters: more than fit in the context length of "
                                             "64 tokens with this tokenizer (at most 64 characters)"),
    ("/generate", {"text": "x" * 64}, "text", "the prompt has 64 tokens; the context length is 64"),
    ("/generate", {"text": ["ok", "x" * 65]}, "text", "65 characters"),
    ("/generate", {"input_ids": [1] * 64}, "input_ids", "the prompt has 64 tokens"),
    ("/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 63}}, "max_new_tokens",
     "This model's maximum context length is 64 tokens. However, you requested 65 tokens (2 in the messages, 63 in "
     "the completion)."),
    ("/generate", {"input_ids": [1, 2], "sampling_params": {"n": 129}}, "n", "n must be in [1, 128], got 129"),
    ("/generate", {"input_ids": [1, 2], "sampling_params": {"stop": list("abcdefghijklmnopq")}}, "stop",
     "stop takes at most 16 stop strings, got 17"),
    ("/generate", {"input_ids": [1, 2], "sampling_params": {"stop": "s" * 257}}, "stop", "at most 256 characters"),
    ("/generate", {"input_ids": [1, 2], "sampling_params": {"stop_token_ids": [1] * 257}}, "stop_token_ids",
     "at most 256 ids, got 257"),
    ("/generate", {"input_ids": [1, 2], "sampling_params": {"stop_token_ids": [-1]}}, "stop_token_ids", ">= 0"),
    ("/generate", {"input_ids": [1, 2], "sampling_params": {"stop_token_ids": [1.5]}}, "stop_token_ids",
     "a list of integers"),
    ("/generate", {"input_ids": [1, 2], "sampling_params": {"logit_bias": {str(i): 1 for i in range(1025)}}},
     "logit_bias", "at most 1024 entries, got 1025"),
    ("/generate", {"input_ids": [1, 2], "sampling_params": {"json_schema": " " * (256 * 1024 + 1)}}, "json_schema",
     "json_schema may be at most 262144 characters"),
    ("/generate", {"input_ids": [1, 2], "sampling_params": {"stop_regex": "("}}, "stop_regex", "invalid stop_regex"),
    ("/v1/completions", {"prompt": "hello", "stop_regex": ["ok", "(.{1,60}){1,60}"]}, "stop_regex",
     "more than 2048 instructions"),
    ("/v1/completions", {"prompt": "hello", "n": 129}, "n", "less than or equal to 128"),
    ("/generate", {"text": ["a"] * 4097}, "text", "at most 4096 prompts per request, got 4097"),
    ("/generate", {"input_ids": [[1]] * 4097}, "input_ids", "at most 4096 prompts per request, got 4097"),
    ("/v1/completions", {"prompt": ["a"] * 33, "n": 128}, "n", "at most 4096 sequences (prompts x n) per request, "
     "got 4224"),
    ("/v1/completions", {"prompt": "hello", "max_tokens": 60}, "max_tokens",
     "requested 65 tokens (5 in the messages, 60 in the completion)"),
    ("/v1/completions", {"prompt": "x" * 65}, "prompt", "65 characters"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 40},
                                           {"role": "user", "content": [{"type": "text", "text": "y" * 25}]}]},
     "messages", "the prompt has 65 characters"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 129}, "n", "128"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stop": list("abcdefghijklmnopq")},
     "stop", "at most 16"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stop_regex": "("}, "stop_regex",
     "invalid stop_regex"),
    ("/generate", {"input_ids": [1, 2], "sampling_params": {"regex": "("}}, "regex", "invalid regex"),
    ("/v1/completions", {"prompt": [1, 2, 999]}, "prompt", "token ids"),
    ("/v1/completions", {"prompt": "hello", "max_tokens": 100}, "max_tokens", "context length"),
    ("/v1/completions", {"prompt": "hello", "suffix": "!"}, "suffix", "suffix"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens",
     "greater than"),
    # engine checks, reported under the OpenAI field names
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 100}, "max_tokens",
     "context length"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "min_tokens": 5},
     "min_tokens", "min_new_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 64}]}, "messages",
     "the prompt has 64 tokens"),
    ("/v1/detokenize", {"tokens": [-3]}, "tokens", "tokens"),
    ("/abort_request", {}, "rid", "rid"),
])
def test_user_error_is_400_naming_the_field(app: Any, path: str, body: dict[str, Any], param: str,
                                            needle: str) -> None:
    status, out = request(app, "POST", path, body)
    assert status == 400, out
    assert out["error"]["param"] == param and out["error"]["type"] == "invalid_request_error", out
    assert needle in out["error"]["message"], out


def test_limits_accept_what_fits(engine: StubEngine) -> None:
    """The other side of the limits: a prompt of exactly the character bound, stop_token_ids beyond the
    vocabulary (like SGLang: they never match), and a max_new_tokens the request did not set, lowered to fit."""
    ids, params, _ = engine.prepare("x" * 60, {"stop_token_ids": [VOCAB, 10**9]}, None)
    assert len(ids[0]) == 60 and params[0].stop_token_ids == [VOCAB, 10**9]
    assert params[0].max_new_tokens == 4  # the native default of 128, lowered to the 4 that fit
    _, params, _ = engine.prepare("x" * 10, {}, None, {"max_new_tokens": 16})  # OpenAI completions' default
    assert params[0].max_new_tokens == 16
    _, params, _ = engine.prepare("x" * 60, {"max_new_tokens": None}, None, {"max_new_tokens": 16})
    assert params[0].max_new_tokens == 4
    _, params, _ = engine.prepare("x" * 60, {"max_new_tokens": 4}, None)
    assert params[0].max_new_tokens == 4
    _, params, _ = engine.prepare(None, {"max_new_tokens": None}, [1] * 63)
    assert params[0].max_new_tokens is None  # until the context is full (the chat default)


def test_unknown_fields_are_ignored_and_logged_once_per_name(app: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Vendor extras are accepted (the request goes on to its real check), one WARNING per field name and place per
    process, nested objects included; the native sampling_params stays strict."""
    body = {"messages": [{"role": "user", "content": "x" * 65, "weird_msg_field": 1}],
            "weird_top_field": {"a": 1}}
    with caplog.at_level(logging.WARNING, logger="radixlm.server.protocol"):
        for _ in range(3):
            status, out = request(app, "POST", "/v1/chat/completions", body)
            assert status == 400 and out["error"]["param"] == "messages"  # checked as without the extras
        request(app, "POST", "/v1/completions", {"prompt": "x" * 65, "weird_top_field": 1})
    warnings = [r.getMessage() for r in caplog.records if "weird" in r.getMessage()]
    assert warnings == ["ignoring unknown field 'weird_msg_field' in /v1/chat/completions messages",
                        "ignoring unknown field 'weird_top_field' in /v1/chat/completions requests",
                        "ignoring unknown field 'weird_top_field' in /v1/completions requests"]
    status, out = request(app, "POST", "/generate", {"input_ids": [1], "sampling_params": {"weird_sp": 1}})
    assert status == 400 and out["error"]["param"] == "weird_sp"
