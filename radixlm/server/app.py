"""The FastAPI application: routes, the plain ASGI middlewares around them (API key, body size limit, the count of
requests being served, internal errors), and the mapping of every failure to an OpenAI-style error.

Errors: a malformed body, a wrong type or an invalid value (pydantic's validation errors and
``InvalidRequestError``, nothing else) is a 400 whose message names the field; a missing or wrong API key a 401; an
unknown route a 404; a body over ``--max-request-body-bytes`` a 413; a request the engine cannot take now a 503
(with ``Retry-After`` when the queue is full or the server drains; without when the engine is dead); a request the
engine failed after accepting it (a scheduler crash, hang or kill, an error delivering its output) a 500 naming the
error; any other exception is a bug, a 500 whose traceback goes to the log.  A stream that fails after its first
bytes ends with an error event (``data: {"error": ...}``) and ``data: [DONE]``, never a dropped connection.  None of
them affects other requests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from radixlm.engine.request_state import EngineUnavailableError, RequestFailedError
from radixlm.errors import InvalidRequestError, error_body
from radixlm.lora import LoRAAdapterError
from radixlm.server.auth import ApiKeyMiddleware
from radixlm.server.native_api import NativeServing
from radixlm.server.openai_api import OpenAIServing
from radixlm.server.protocol import (
    AbortRequestBody,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    GenerateRequestBody,
    LoadLoRAAdapterRequest,
    TokenizeRequest,
    UnloadLoRAAdapterRequest,
)
from radixlm.server.streams import ClientDisconnected, json_text, sse

if TYPE_CHECKING:
    from radixlm.engine.engine import Engine

logger = logging.getLogger(__name__)

BodyT = TypeVar("BodyT", bound=BaseModel)

# Routes that answer without an API key (load balancers probe them).
INTERNAL_ERROR_MESSAGE_CHARS = 200  # of "<type>: <message>" in a 500's body
ECHOED_INPUT_CHARS = 200  # of the invalid value a 400's message quotes


class StrictJSONResponse(JSONResponse):
    """JSON that every client parses: no ``NaN``/``Infinity`` tokens (``json_text``), where Starlette's own
    encoder raises on them (a 500 for an answer that was fine)."""

    def render(self, content: Any) -> bytes:
        return json_text(content, separators=(",", ":")).encode("utf-8")


def error(status: int, message: str, param: str | None = None) -> JSONResponse:
    return StrictJSONResponse(error_body(message, status, param), status_code=status)


def respond(result: Any) -> Any:
    """A handler's result: an async iterator of SSE lines becomes a streaming response."""
    if isinstance(result, AsyncIterator):
        return StreamingResponse(_ending_in_error_event(result), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return StrictJSONResponse(result)


async def _ending_in_error_event(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """A stream whose status line is gone already (200) can only report a failure in-band: one
    ``data: {"error": {...}}`` event with the OpenAI error body of the status it would have got, then ``[DONE]``, as
    OpenAI-compatible servers do (the ``openai`` client raises it as an APIError).  400 for a client mistake the
    scheduler found (a grammar that does not compile, or not in time), 500 for a request the engine failed, 503 for
    an engine that takes no requests."""
    try:
        async for line in lines:
            yield line
    except Exception as exc:
        param = None
        if isinstance(exc, InvalidRequestError):
            status, message, param = 400, str(exc), exc.param
        elif isinstance(exc, RequestFailedError):
            status, message = 500, str(exc)
        elif isinstance(exc, EngineUnavailableError):
            status, message = 503, str(exc)
        else:
            logger.error("internal error while streaming a response", exc_info=exc)
            status, message = 500, _internal_error_message(exc)
        yield sse(error_body(message, status, param))
        yield "data: [DONE]\n\n"


class _BodyTooLarge(Exception):
    pass


class BodySizeLimitMiddleware:
    """A request body over ``max_bytes`` is a 413, judged from its ``Content-Length`` before anything is read, and
    while it arrives (a chunked upload has none, and a client may send more than it announced): the handler reading
    the body stops at the first chunk past the limit.  Plain ASGI, as ``ApiKeyMiddleware``."""

    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> JSONResponse:
        body = error_body(f"the request body is larger than {self.max_bytes} bytes (--max-request-body-bytes)", 413)
        body["error"]["type"] = "invalid_request_error"
        return JSONResponse(body, status_code=413)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        announced = dict(scope.get("headers") or []).get(b"content-length", b"")
        if announced.isdigit() and int(announced) > self.max_bytes:
            await self._too_large()(scope, receive, send)
            return
        received = 0
        started = False

        async def counting_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge()
            return message

        async def send_tracking(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, send_tracking)
        except _BodyTooLarge:
            if started:
                raise
            await self._too_large()(scope, receive, send)


class InFlight:
    """The number of HTTP requests being served (their responses not yet written to the end): the drain and the exit
    after an engine failure wait for it to reach 0."""

    def __init__(self) -> None:
        self.count = 0


class InFlightMiddleware:
    def __init__(self, app: Any, in_flight: InFlight):
        self.app = app
        self.in_flight = in_flight

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.in_flight.count += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight.count -= 1


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
    return error(500, _internal_error_message(exc))


def _internal_error_message(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    summary = type(exc).__name__ + (f": {lines[0]}" if lines else "")
    if len(summary) > INTERNAL_ERROR_MESSAGE_CHARS:
        summary = summary[:INTERNAL_ERROR_MESSAGE_CHARS] + "..."
    return f"internal server error: {summary}"


def create_app(engine: "Engine", chat_template: str | None = None) -> FastAPI:
    args = engine.server_args
    model_name = engine.model_name
    openai = OpenAIServing(engine, model_name, chat_template)
    native = NativeServing(engine, model_name)
    app = FastAPI(title="radixlm", version=_version(), default_response_class=StrictJSONResponse)
    created = int(time.time())
    app.state.in_flight = InFlight()
    bodies = BodySchemas()

    # Innermost first: the body limit applies to authorized requests only (an unauthorized body is never read).
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=args.max_request_body_bytes)
    if args.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=args.api_key)
    app.add_middleware(InFlightMiddleware, in_flight=app.state.in_flight)
    app.add_middleware(InternalErrorMiddleware)

    @app.exception_handler(RequestValidationError)
    @app.exception_handler(ValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError | ValidationError) -> JSONResponse:
        return error(400, *_describe(exc.errors()))

    @app.exception_handler(InvalidRequestError)
    async def on_invalid_request(request: Request, exc: InvalidRequestError) -> JSONResponse:
        return error(400, str(exc), exc.param)

    @app.exception_handler(EngineUnavailableError)
    async def on_unavailable(request: Request, exc: EngineUnavailableError) -> JSONResponse:
        response = error(503, str(exc))
        if exc.retry_after is not None:
            response.headers["Retry-After"] = str(exc.retry_after)
        return response

    @app.exception_handler(RequestFailedError)
    async def on_failed(request: Request, exc: RequestFailedError) -> JSONResponse:
        return error(500, str(exc))

    @app.exception_handler(ClientDisconnected)
    async def on_gone(request: Request, exc: ClientDisconnected) -> JSONResponse:
        return error(499, "client disconnected; the request was aborted")

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    # ------------------------------------------------------------------ OpenAI
    @app.post("/v1/chat/completions", openapi_extra=bodies(ChatCompletionRequest))
    async def chat_completions(raw: Request) -> Any:
        body = await parse_body(raw, ChatCompletionRequest)
        return respond(await openai.chat(body, raw))

    @app.post("/v1/completions", openapi_extra=bodies(CompletionRequest))
    async def completions(raw: Request) -> Any:
        body = await parse_body(raw, CompletionRequest)
        return respond(await openai.completions(body, raw))

    @app.get("/v1/models")
    async def models() -> Any:
        """The base model, then each served LoRA adapter as ``<base>:<adapter>`` (``parent``: the base)."""
        base = {"id": model_name, "object": "model", "created": created, "owned_by": "radixlm",
                "root": engine.model_path, "parent": None, "max_model_len": engine.info.context_length}
        adapters = [{**base, "id": f"{model_name}:{name}", "root": path, "parent": model_name}
                    for name, path in engine.lora.served().items()]
        return {"object": "list", "data": [base, *adapters]}

    @app.post("/v1/tokenize", openapi_extra=bodies(TokenizeRequest))
    async def tokenize(raw: Request) -> Any:
        body = await parse_body(raw, TokenizeRequest)
        encoded = await asyncio.to_thread(engine.require_tokenizer(), body.prompt, add_special_tokens=body.add_special_tokens)
        ids = encoded.input_ids
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.info.context_length}

    @app.post("/v1/detokenize", openapi_extra=bodies(DetokenizeRequest))
    async def detokenize(raw: Request) -> Any:
        body = await parse_body(raw, DetokenizeRequest)
        bad = [t for t in body.tokens if not 0 <= t < engine.info.vocab_size]
        if bad:
            raise InvalidRequestError(f"tokens must be ids in [0, {engine.info.vocab_size}), got {bad[0]}", "tokens")
        return {"text": await asyncio.to_thread(engine.require_tokenizer().decode, body.tokens)}

    # ------------------------------------------------------------------ native (SGLang)
    @app.post("/generate", openapi_extra=bodies(GenerateRequestBody))
    async def generate(raw: Request) -> Any:
        body = await parse_body(raw, GenerateRequestBody)
        return respond(await native.generate(body, raw))

    if engine.metrics is not None:
        @app.get("/metrics")
        async def metrics() -> Any:
            return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health() -> Any:
        engine.check_admitting()  # a draining server answers 503, so that load balancers take it out
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
    @app.get("/model_info")  # SGLang's newer name; sglang-router reads this one
    async def get_model_info() -> Any:
        return native.model_info()

    @app.get("/get_server_info")
    @app.get("/server_info")
    async def get_server_info() -> Any:
        engine.check_ready()
        return await native.server_info()

    @app.get("/get_load")
    async def get_load() -> Any:
        engine.check_ready()
        return await native.load()

    @app.get("/flush_cache")
    @app.post("/flush_cache")
    async def flush_cache() -> Any:
        engine.check_ready()
        reply = await engine.async_control("flush_cache")
        if not reply.ok:
            return error(400, reply.payload["message"])
        return JSONResponse({"message": reply.payload["message"]})

    @app.post("/load_lora_adapter", openapi_extra=bodies(LoadLoRAAdapterRequest))
    async def load_lora_adapter(raw: Request) -> Any:
        """Serve a PEFT adapter from now on: 200 with its rank and modules, or 400 with what is wrong with it."""
        body = await parse_body(raw, LoadLoRAAdapterRequest)
        engine.check_ready()
        try:
            info = await asyncio.to_thread(engine.load_lora_adapter, body.lora_name, body.lora_path)
        except LoRAAdapterError as e:
            return error(400, str(e), "lora_path")
        return JSONResponse({"success": True, "message": f"LoRA adapter {body.lora_name!r} loaded", **info})

    @app.post("/unload_lora_adapter", openapi_extra=bodies(UnloadLoRAAdapterRequest))
    async def unload_lora_adapter(raw: Request) -> Any:
        """Stop serving an adapter: new requests naming it get a 400 at once; this call answers once its requests
        in flight have finished (normally) and every rank has freed it."""
        body = await parse_body(raw, UnloadLoRAAdapterRequest)
        engine.check_ready()
        try:
            await asyncio.to_thread(engine.unload_lora_adapter, body.lora_name)
        except LoRAAdapterError as e:
            return error(400, str(e), "lora_name")
        return JSONResponse({"success": True, "message": f"LoRA adapter {body.lora_name!r} unloaded"})

    @app.post("/abort_request", openapi_extra=bodies(AbortRequestBody))
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

    bodies.publish(app)
    return app


# ``error_body``'s shape, OpenAI's error object
ERROR_RESPONSE_SCHEMA = {
    "type": "object", "required": ["error"], "title": "ErrorResponse",
    "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"anyOf": [{"type": "string"}, {"type": "null"}]}, "code": {"type": "integer"}}}},
}


class BodySchemas:
    """The request bodies of ``/openapi.json``.  Routes parse their bodies themselves (``parse_body``: any
    Content-Type, an empty body is ``{}``), which FastAPI's own body parameters would not; so each route declares its
    model through ``openapi_extra=bodies(Model)``, and ``publish`` adds the models' JSON schemas (and those of the
    models inside them) under ``components/schemas``, with ``ErrorResponse``, the body of a 400 to such a body."""

    def __init__(self) -> None:
        self.models: dict[str, type[BaseModel]] = {}

    def __call__(self, model: type[BaseModel]) -> dict[str, Any]:
        """``openapi_extra`` for a route whose JSON body is ``model``; required when the model has a required field
        (an empty body, read as ``{}``, fails validation then)."""
        self.models[model.__name__] = model
        required = any(field.is_required() for field in model.model_fields.values())
        return {"requestBody": {"required": required, "content": {"application/json": {"schema": {
            "$ref": f"#/components/schemas/{model.__name__}"}}}},
                "responses": {"400": {"description": "Invalid request (the field is named in error.param)",
                                      "content": {"application/json": {"schema": {
                                          "$ref": "#/components/schemas/ErrorResponse"}}}}}}

    def publish(self, app: FastAPI) -> None:
        def openapi() -> dict[str, Any]:
            if app.openapi_schema is None:
                schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
                _, defs = models_json_schema([(m, "validation") for m in self.models.values()],
                                             ref_template="#/components/schemas/{model}")
                components = schema.setdefault("components", {}).setdefault("schemas", {})
                components.update(defs.get("$defs", {}), ErrorResponse=ERROR_RESPONSE_SCHEMA)
                app.openapi_schema = schema
            return app.openapi_schema

        app.openapi = openapi  # type: ignore[method-assign]


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
    got = repr(first.get("input"))
    if len(got) > ECHOED_INPUT_CHARS:  # a 1 MB string is not echoed back in full
        got = f"{got[:ECHOED_INPUT_CHARS]}... ({len(got)} characters)"
    return f"{param or 'body'}: {first.get('msg')}; got {got}{more}", param


def _version() -> str:
    from radixlm import __version__

    return __version__
