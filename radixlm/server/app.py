"""The FastAPI application: routes, API-key check, and the mapping of every failure to an OpenAI-style error.

Errors: a malformed body, a wrong type or an invalid value (pydantic's validation errors and
``InvalidRequestError``, nothing else) is a 400 whose message names the field; a missing or wrong API key a 401; an
unknown route a 404; a dead scheduler a 503; any other exception is a bug, a 500 whose traceback goes to the log.
None of them affects other requests.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from radixlm.engine.request_state import EngineDeadError
from radixlm.errors import InvalidRequestError
from radixlm.server.native_api import NativeServing
from radixlm.server.openai_api import OpenAIServing
from radixlm.server.protocol import (
    AbortRequestBody,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    GenerateRequestBody,
    TokenizeRequest,
    error_body,
)
from radixlm.server.streams import ClientDisconnected, sse

if TYPE_CHECKING:
    from radixlm.engine.engine import Engine

logger = logging.getLogger(__name__)

BodyT = TypeVar("BodyT", bound=BaseModel)

# Routes that answer without an API key (load balancers probe them).
OPEN_ROUTES = frozenset({"/health"})
INTERNAL_ERROR_MESSAGE_CHARS = 200  # of "<type>: <message>" in a 500's body


def error(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param), status_code=status)


def respond(result: Any) -> Any:
    """A handler's result: an async iterator of SSE lines becomes a streaming response."""
    if isinstance(result, AsyncIterator):
        return StreamingResponse(_error_events(result), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return JSONResponse(result)


async def _error_events(stream: AsyncIterator[str]) -> AsyncIterator[str]:
    """A stream whose request fails after the headers went out (200) ends with the error it would have got as a
    status (400 for a client mistake found by the scheduler, such as a grammar that does not compile in time;
    503 for a dead engine): one ``data: {"error": {...}}`` event with the OpenAI error body, then ``[DONE]``."""
    try:
        async for line in stream:
            yield line
    except InvalidRequestError as e:
        yield sse(error_body(str(e), 400, e.param))
        yield "data: [DONE]\n\n"
    except EngineDeadError as e:
        yield sse(error_body(str(e), 503))
        yield "data: [DONE]\n\n"


class ApiKeyMiddleware:
    """``Authorization: Bearer <key>`` on every route but ``OPEN_ROUTES``.  Plain ASGI, so that streaming and
    client-disconnect detection pass through untouched."""

    def __init__(self, app: Any, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_ROUTES:
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = error(401, "invalid or missing API key: send 'Authorization: Bearer <key>'")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class InternalErrorMiddleware:
    """Whatever exception no handler claimed becomes a 500 with an OpenAI-style body and its traceback in the log,
    and the server goes on serving.  Plain ASGI, as ``ApiKeyMiddleware``; not a FastAPI handler for
    ``Exception``, which Starlette re-raises after answering (the server then drops the connection)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception as exc:
            if started:  # a stream broke midway: only the server can end it (it logs the traceback and closes)
                raise
            logger.error("internal error serving %s %s", scope.get("method"), scope.get("path"), exc_info=exc)
            await internal_error(exc)(scope, receive, send)


def internal_error(exc: Exception) -> JSONResponse:
    """The 500 for a bug: the exception's type and the first line of its message, never its traceback."""
    lines = str(exc).strip().splitlines()
    summary = type(exc).__name__ + (f": {lines[0]}" if lines else "")
    if len(summary) > INTERNAL_ERROR_MESSAGE_CHARS:
        summary = summary[:INTERNAL_ERROR_MESSAGE_CHARS] + "..."
    return error(500, f"internal server error: {summary}")


def create_app(engine: "Engine", chat_template: str | None = None) -> FastAPI:
    args = engine.server_args
    model_name = engine.model_name
    openai = OpenAIServing(engine, model_name, chat_template)
    native = NativeServing(engine, model_name)
    app = FastAPI(title="radixlm", version=_version())
    created = int(time.time())

    if args.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=args.api_key)
    app.add_middleware(InternalErrorMiddleware)

    @app.exception_handler(RequestValidationError)
    @app.exception_handler(ValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError | ValidationError) -> JSONResponse:
        return error(400, *_describe(exc.errors()))

    @app.exception_handler(InvalidRequestError)
    async def on_invalid_request(request: Request, exc: InvalidRequestError) -> JSONResponse:
        return error(400, str(exc), exc.param)

    @app.exception_handler(EngineDeadError)
    async def on_dead(request: Request, exc: EngineDeadError) -> JSONResponse:
        return error(503, str(exc))

    @app.exception_handler(ClientDisconnected)
    async def on_gone(request: Request, exc: ClientDisconnected) -> JSONResponse:
        return error(499, "client disconnected; the request was aborted")

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    # ------------------------------------------------------------------ OpenAI
    @app.post("/v1/chat/completions")
    async def chat_completions(raw: Request) -> Any:
        body = await parse_body(raw, ChatCompletionRequest)
        return respond(await openai.chat(body, raw))

    @app.post("/v1/completions")
    async def completions(raw: Request) -> Any:
        body = await parse_body(raw, CompletionRequest)
        return respond(await openai.completions(body, raw))

    @app.get("/v1/models")
    async def models() -> Any:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "radixlm", "root": engine.model_path,
                                            "max_model_len": engine.info.context_length}]}

    @app.post("/v1/tokenize")
    async def tokenize(raw: Request) -> Any:
        body = await parse_body(raw, TokenizeRequest)
        encoded = await asyncio.to_thread(engine.require_tokenizer(), body.prompt, add_special_tokens=body.add_special_tokens)
        ids = encoded.input_ids
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.info.context_length}

    @app.post("/v1/detokenize")
    async def detokenize(raw: Request) -> Any:
        body = await parse_body(raw, DetokenizeRequest)
        bad = [t for t in body.tokens if not 0 <= t < engine.info.vocab_size]
        if bad:
            raise InvalidRequestError(f"tokens must be ids in [0, {engine.info.vocab_size}), got {bad[0]}", "tokens")
        return {"text": await asyncio.to_thread(engine.require_tokenizer().decode, body.tokens)}

    # ------------------------------------------------------------------ native (SGLang)
    @app.post("/generate")
    async def generate(raw: Request) -> Any:
        body = await parse_body(raw, GenerateRequestBody)
        return respond(await native.generate(body, raw))

    if engine.metrics is not None:
        @app.get("/metrics")
        async def metrics() -> Any:
            return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health() -> Any:
        engine.check_ready()
        return JSONResponse({})

    @app.get("/health_generate")
    async def health_generate() -> Any:
        try:
            await native.health_generate()
        except Exception as e:  # timeout or dead engine: unhealthy, whatever the cause
            logger.warning("health_generate failed: %s", e)
            return error(503, f"health check generation failed: {e or type(e).__name__}")
        return JSONResponse({})

    @app.get("/get_model_info")
    async def get_model_info() -> Any:
        return native.model_info()

    @app.get("/get_server_info")
    async def get_server_info() -> Any:
        engine.check_ready()
        return await native.server_info()

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> Any:
        engine.check_ready()
        reply = await engine.async_control("flush_cache")
        if not reply.ok:
            return error(400, reply.payload["message"])
        return JSONResponse({"message": reply.payload["message"]})

    @app.post("/abort_request")
    async def abort_request(raw: Request) -> Any:
        body = await parse_body(raw, AbortRequestBody)
        engine.check_ready()
        if body.abort_all:
            engine.abort_all()
        elif body.rid:
            engine.abort(body.rid)
        else:
            raise InvalidRequestError("give rid, or abort_all: true", "rid")
        return JSONResponse({})

    return app


async def parse_body(raw: Request, model: type[BodyT]) -> BodyT:
    """The JSON body as ``model``, whatever the Content-Type (SGLang clients often send none)."""
    return model.model_validate_json(await raw.body() or b"{}")


def _describe(problems: Any) -> tuple[str, str | None]:
    """The first validation problem as (message, param)."""
    if not problems:
        return "invalid request body", None
    first = problems[0]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # pydantic's union branches appear in the location (e.g. 'str', 'list[str]'); drop them
    loc = [p for p in loc if not any(c in p for c in "[]") and p not in {"str", "int", "float", "bool", "function-after"}]
    param = ".".join(loc) or None
    if first.get("type") == "missing":
        return f"missing required field {param!r}", param
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    return f"{param or 'body'}: {first.get('msg')}; got {first.get('input')!r}{more}", param


def _version() -> str:
    from radixlm import __version__

    return __version__
