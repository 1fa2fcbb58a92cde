"""``/openapi.json`` publishes every route's real request body (the pydantic models of ``protocol.py``), while the
routes keep parsing bodies themselves: any Content-Type or none, an empty body read as ``{}``, the same 400s."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import jsonschema
import pytest
from test_server_errors import StubEngine

from radixlm.server.app import create_app
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

BODIES = {
    "/v1/chat/completions": (ChatCompletionRequest, True, ["messages"]),
    "/v1/completions": (CompletionRequest, True, ["prompt"]),
    "/v1/tokenize": (TokenizeRequest, True, ["prompt"]),
    "/v1/detokenize": (DetokenizeRequest, True, ["tokens"]),
    "/generate": (GenerateRequestBody, False, []),
    "/abort_request": (AbortRequestBody, False, []),
    "/load_lora_adapter": (LoadLoRAAdapterRequest, True, ["lora_name", "lora_path"]),
    "/unload_lora_adapter": (UnloadLoRAAdapterRequest, True, ["lora_name"]),
}


def call(app: Any, method: str, path: str, body: bytes = b"", content_type: str | None = None) -> tuple[int, Any]:
    """(status, JSON body) of one request, with the raw ``body`` and ``content_type`` (None: no header)."""
    messages: list[dict[str, Any]] = []

    async def run() -> None:
        pending = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if pending:
                return pending.pop()
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            messages.append(message)

        headers = [] if content_type is None else [(b"content-type", content_type.encode())]
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                 "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
        await app(scope, receive, send)

    asyncio.run(run())
    status = next(m["status"] for m in messages if m["type"] == "http.response.start")
    return status, json.loads(b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body"))


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    status, doc = call(create_app(StubEngine()), "GET", "/openapi.json")  # type: ignore[arg-type]
    assert status == 200
    return doc


@pytest.mark.parametrize("path", sorted(BODIES))
def test_every_post_route_publishes_its_model(spec: dict[str, Any], path: str) -> None:
    model, required, fields = BODIES[path]
    body = spec["paths"][path]["post"]["requestBody"]
    assert body == {"required": required, "content": {"application/json": {"schema": {
        "$ref": f"#/components/schemas/{model.__name__}"}}}}
    schema = spec["components"]["schemas"][model.__name__]
    assert schema.get("required", []) == fields
    assert set(schema["properties"]) == set(model.model_fields)


def test_no_route_publishes_an_empty_body(spec: dict[str, Any]) -> None:
    """Every POST route but /flush_cache (which takes no body) has a request body, and every $ref resolves."""
    posts = {path for path, ops in spec["paths"].items() if "post" in ops}
    assert posts - set(BODIES) == {"/flush_cache"}
    refs = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                refs.add(node["$ref"].rsplit("/", 1)[-1])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(spec)
    assert refs <= set(spec["components"]["schemas"])
    assert {"ChatMessage", "TextPart", "ImagePart", "ResponseFormat", "StreamOptions"} <= refs


def test_a_schema_driven_client_sees_the_real_fields(spec: dict[str, Any]) -> None:
    """Validated against the published schema alone (as a generated client would), real bodies pass and broken
    ones fail where pydantic fails them."""
    components = spec["components"]["schemas"]
    chat = components["ChatCompletionRequest"]
    nested = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
              "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
              "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto",
              "logprobs": True, "top_logprobs": 3, "stop": ["\n"], "logit_bias": {"5": -1.5}, "n": 2}

    def validate(name: str, body: Any) -> None:
        jsonschema.validate(body, {**components[name], "components": {"schemas": components}})

    validate("ChatCompletionRequest", nested)
    ChatCompletionRequest.model_validate(nested)
    for bad in ({"messages": []}, {"messages": [{"role": "robot"}]}, {"messages": [{"role": "user"}], "n": 0},
                {"messages": [{"role": "user"}], "top_logprobs": 21}, {"model": "m"}):
        with pytest.raises(jsonschema.ValidationError):
            validate("ChatCompletionRequest", bad)
    assert chat["properties"]["messages"]["items"] == {"$ref": "#/components/schemas/ChatMessage"}
    validate("GenerateRequestBody", {"text": ["a", "b"], "sampling_params": {"max_new_tokens": 4},
                                     "return_logprob": True, "top_logprobs_num": 2})
    with pytest.raises(jsonschema.ValidationError):
        validate("GenerateRequestBody", {"input_ids": "not ids"})
    validate("CompletionRequest", {"prompt": [[1, 2], [3]]})
    validate("DetokenizeRequest", {"tokens": [1, 2]})


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "application/json"])
def test_bodies_parse_whatever_the_content_type(content_type: str | None) -> None:
    app = create_app(StubEngine())  # type: ignore[arg-type]
    assert call(app, "POST", "/v1/detokenize", b'{"tokens": [72, 73]}', content_type) == (200, {"text": "HI"})


def test_a_400_matches_the_published_error_schema(spec: dict[str, Any]) -> None:
    components = spec["components"]["schemas"]
    ref = spec["paths"]["/generate"]["post"]["responses"]["400"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/ErrorResponse"
    status, out = call(create_app(StubEngine()), "POST", "/v1/chat/completions", b'{"messages": 1}')  # type: ignore[arg-type]
    assert status == 400
    jsonschema.validate(out, components["ErrorResponse"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"error": {"message": "m"}}, components["ErrorResponse"])


def test_empty_bodies_and_bad_json_keep_their_answers() -> None:
    app = create_app(StubEngine())  # type: ignore[arg-type]
    assert call(app, "POST", "/v1/tokenize") == (400, {"error": {
        "message": "missing required field 'prompt'", "type": "invalid_request_error", "param": "prompt",
        "code": 400}})
    status, out = call(app, "POST", "/abort_request")  # {}: neither rid nor abort_all
    assert (status, out["error"]["param"]) == (400, "rid")
    status, out = call(app, "POST", "/v1/tokenize", b'{"prompt": ', "text/plain")
    assert status == 400 and out["error"]["message"].startswith("the request body is not valid JSON: ")
