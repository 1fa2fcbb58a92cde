"""The HTTP server's error mapping, in process around a stub engine (no scheduler, no model): a request the caller
got wrong is a 400 naming the field, any other exception a 500 that leaves the server serving."""

from __future__ import annotations

import asyncio
import json
import logging
from types import SimpleNamespace
from typing import Any

import pytest

from radixlm.config import ServerArgs
from radixlm.engine.engine import Engine
from radixlm.engine.io_struct import SchedulerInfo
from radixlm.server.app import create_app

VOCAB = 100


class StubTokenizer:
    """Characters as token ids."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> SimpleNamespace:
        return SimpleNamespace(input_ids=[ord(c) % VOCAB for c in text])

    def __len__(self) -> int:
        return VOCAB

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        return "".join(m["content"] for m in messages)


class StubEngine:
    """What the routes use of an Engine; requests are validated by the real ``Engine.prepare``."""

    prepare = Engine.prepare
    _parse_params = Engine._parse_params
    require_tokenizer = Engine.require_tokenizer

    def __init__(self) -> None:
        self.server_args = ServerArgs(device="cpu", attention_backend="torch_native", random_seed=0)
        self.model_name = self.model_path = "stub"
        self.metrics = None
        self.tokenizer = StubTokenizer()
        self.info = SchedulerInfo(max_total_num_tokens=1024, max_running_requests=8, context_length=64,
                                  vocab_size=VOCAB)

    def check_ready(self) -> None:
        pass

    async def submit(self, *args: Any) -> list:
        raise AssertionError("these tests never get a request to the scheduler")


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

    engine.tokenizer = SimpleNamespace(decode=lambda ids: (_ for _ in ()).throw(RuntimeError("decoder crashed")))
    status, out = request(app, "POST", "/v1/detokenize", {"tokens": [1, 2]})
    assert status == 500 and out["error"]["message"] == "internal server error: RuntimeError: decoder crashed"

    assert request(app, "GET", "/v1/models")[0] == 200
    engine.tokenizer = StubTokenizer()
    assert request(app, "POST", "/v1/detokenize", {"tokens": [72, 73]}) == (200, {"text": "HI"})


@pytest.mark.parametrize(("path", "body", "param", "needle"), [
    ("/generate", {"input_ids": [1, 2], "sampling_params": {"temperature": -1}}, "temperature", "temperature"),
    ("/generate", {"input_ids": [1, 2], "sampling_params": {"temperature": "hot"}}, "temperature", "a number"),
    ("/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_token": 3}}, "max_new_token", "unknown"),
    ("/generate", {"text": "x" * 80}, "text", "context length"),
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
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 80}]}, "messages", "context length"),
    ("/v1/detokenize", {"tokens": [-3]}, "tokens", "tokens"),
    ("/abort_request", {}, "rid", "rid"),
])
def test_user_error_is_400_naming_the_field(app: Any, path: str, body: dict[str, Any], param: str,
                                            needle: str) -> None:
    status, out = request(app, "POST", path, body)
    assert status == 400, out
    assert out["error"]["param"] == param and out["error"]["type"] == "invalid_request_error", out
    assert needle in out["error"]["message"], out
