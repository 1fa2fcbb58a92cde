"""The HTTP server's guards, in process around a stub engine (no scheduler, no model): the API key on every route
but /health, the request body size limit, and the secure defaults of ``ServerArgs``."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.routing import Route

from radixlm.config import ServerArgs
from radixlm.config.server_args import API_KEY_ENV
from radixlm.server.app import create_app
from radixlm.server.auth import OPEN_ROUTES
from stub_engine import StubEngine

KEY = "s3cret-clé-ß"  # non-ASCII on purpose: compared as UTF-8 bytes, never as str


def request(app: Any, method: str, path: str, chunks: list[bytes] = (), headers: dict[str, bytes] | None = None
            ) -> tuple[int, Any, int]:
    """(status, parsed body, chunks the app read) of one request sent straight to the ASGI app; ``chunks`` arrive
    one ``http.request`` message each."""
    messages: list[dict[str, Any]] = []
    pending = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    pending = pending or [{"type": "http.request", "body": b"", "more_body": False}]
    read = 0

    async def run() -> None:
        async def receive() -> dict[str, Any]:
            nonlocal read
            if read < len(pending):
                read += 1
                return pending[read - 1]
            await asyncio.Event().wait()  # the client stays connected
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            messages.append(message)

        hdrs = [(b"content-type", b"application/json")] + [(k.encode(), v) for k, v in (headers or {}).items()]
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                 "headers": hdrs, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
        await asyncio.wait_for(app(scope, receive, send), 30)

    asyncio.run(run())
    status = next(m["status"] for m in messages if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    try:
        return status, json.loads(payload), read
    except ValueError:
        return status, payload, read


def _every_route(app: Any) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves, path parameters filled in."""
    out = []
    for route in app.routes:
        assert isinstance(route, Route), f"{route!r}: a new kind of route; make sure the API key covers it"
        path = route.path_format
        for name in route.param_convertors:
            path = path.replace("{" + name + "}", "x")
        out += [(m, path) for m in sorted(route.methods or ()) if m != "HEAD"]
    return out


def test_the_api_key_guards_every_route_but_health() -> None:
    """Enumerated from the app itself, so a route added later is covered without touching this test."""
    app = create_app(StubEngine(api_key=KEY, enable_metrics=True))  # type: ignore[arg-type]
    routes = _every_route(app)
    paths = {p for _, p in routes}
    assert {"/metrics", "/openapi.json", "/docs", "/redoc", "/health_generate", "/flush_cache", "/abort_request",
            "/get_server_info", "/generate", "/v1/chat/completions"} <= paths
    right = {"authorization": f"Bearer {KEY}".encode()}
    for method, path in routes:
        no_key = request(app, method, path)
        wrong = request(app, method, path, headers={"authorization": b"Bearer s3cret-cl\xc3\xa9-x"})
        other_scheme = request(app, method, path, headers={"authorization": f"Basic {KEY}".encode()})
        with_key = request(app, method, path, [b"{}"] if method == "POST" else [], headers=right)
        if path in OPEN_ROUTES:
            assert no_key[0] == wrong[0] == 200, (method, path)
            continue
        for status, body, _ in (no_key, wrong, other_scheme):
            assert status == 401, (method, path, status, body)
            assert body["error"]["type"] == "authentication_error" and "API key" in body["error"]["message"]
        assert with_key[0] != 401, (method, path, with_key)
    assert OPEN_ROUTES == {"/health"}


def test_the_key_is_compared_as_bytes_whatever_the_client_sends() -> None:
    app = create_app(StubEngine(api_key=KEY, enable_metrics=True))  # type: ignore[arg-type]
    assert request(app, "GET", "/v1/models", headers={"authorization": f"bearer {KEY}".encode()})[0] == 200
    for header in (b"Bearer \xff\xfe", b"Bearer", b"", "Bearer s3cret-clé-ß ".encode("latin-1", "replace")):
        assert request(app, "GET", "/v1/models", headers={"authorization": header})[0] == 401, header


def test_the_api_key_can_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert ServerArgs(device="cpu", attention_backend="torch_native").api_key == "from-env"
    assert ServerArgs(device="cpu", attention_backend="torch_native", api_key="flag").api_key == "flag"
    monkeypatch.delenv(API_KEY_ENV)
    assert ServerArgs(device="cpu", attention_backend="torch_native").api_key is None


def test_secure_defaults() -> None:
    args = ServerArgs(device="cpu", attention_backend="torch_native")
    assert args.host == "127.0.0.1" and args.api_key is None
    assert args.max_request_body_bytes == 32 * 1024 * 1024
    from radixlm.distributed import free_local_addr

    assert free_local_addr().startswith("127.0.0.1:")


def test_a_body_over_the_limit_is_413_from_its_length_or_while_it_streams() -> None:
    app = create_app(StubEngine(max_request_body_bytes=100, enable_metrics=True))  # type: ignore[arg-type]
    body = json.dumps({"tokens": [1] * 100}).encode()
    assert len(body) > 100
    # announced: refused before a byte is read
    status, out, read = request(app, "POST", "/v1/detokenize", [body], {"content-length": str(len(body)).encode()})
    assert (status, read) == (413, 0)
    assert out["error"]["code"] == 413 and "--max-request-body-bytes" in out["error"]["message"]
    assert out["error"]["type"] == "invalid_request_error"
    # chunked (no Content-Length): refused at the first chunk past the limit, the rest never read
    chunks = [body[i:i + 40] for i in range(0, len(body), 40)]
    status, out, read = request(app, "POST", "/v1/detokenize", chunks)
    assert status == 413 and read == 3 < len(chunks)
    # a client announcing less than it sends is cut off the same way
    status, _, _ = request(app, "POST", "/v1/detokenize", chunks, {"content-length": b"50"})
    assert status == 413
    # at the limit: served
    small = json.dumps({"tokens": [72, 73]}).encode()
    assert request(app, "POST", "/v1/detokenize", [small[:10], small[10:]])[:2] == (200, {"text": "HI"})


# ---------------------------------------------------------------------------------------------------- chat templates
def _render(chat_template: str | None, content: str, **body: Any) -> list[int]:
    from transformers import AutoTokenizer

    from radixlm.models.embedded import embedded_model_path
    from radixlm.server.openai_api import OpenAIServing
    from radixlm.server.protocol import ChatCompletionRequest

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path())
    engine = SimpleNamespace(server_args=SimpleNamespace(tool_call_parser="hermes"),
                             require_tokenizer=lambda: tokenizer, check_prompt_chars=lambda chars, param: None)
    serving = OpenAIServing(engine, "m", chat_template)  # type: ignore[arg-type]
    request_body = ChatCompletionRequest(messages=[{"role": "user", "content": content}], **body)
    return tokenizer.decode(serving._render_chat(request_body, tools=False))


ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
]


@pytest.mark.parametrize("template", ESCAPES)
def test_chat_templates_render_in_a_sandbox(template: str) -> None:
    """transformers renders chat templates in jinja2's ImmutableSandboxedEnvironment: even an operator's
    --chat-template cannot reach Python internals; the request is refused with a 400."""
    from radixlm.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="chat template"):
        _render(template, "hi")


def test_request_fields_cannot_inject_a_template() -> None:
    from radixlm.errors import InvalidRequestError

    # a message is data: Jinja syntax in it is copied, never evaluated
    text = _render(None, "{{ 7 * 7 }} {% raw %}")
    assert "{{ 7 * 7 }} {% raw %}" in text and "49" not in text
    # chat_template_kwargs are template variables; they cannot replace the template
    with pytest.raises(InvalidRequestError):
        _render(None, "hi", chat_template_kwargs={"chat_template": ESCAPES[1]})
