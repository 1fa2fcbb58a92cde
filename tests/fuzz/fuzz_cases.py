"""Hypothesis strategies for calls to the HTTP API, drawn from the server's own ``/openapi.json``.

Why our own strategies and not schemathesis: hypothesis is already a test dependency, and the mutations that
matter here sit outside what an OpenAPI-driven tool generates (the JSON tokens ``NaN``/``Infinity``/``1e999``,
lone-surrogate escapes, bodies that are not JSON or come with another Content-Type, 10,000-deep nesting); and the
valid half needs semantic knowledge the schema does not carry (tools, grammars and sampling_params are free-form
objects there) and must keep generation cheap (small ``max_tokens`` and ``n``).

A case is one HTTP call: ``Case(method, path, body bytes, content type, note)``.  ``cases(spec)`` draws them for
every route of the spec: a valid body built from the route's schema (``Schemas``, with ``OVERRIDES`` for the
free-form and costly fields) half the time, else such a body mutated by ``mutate`` (wrong types, missing fields,
extreme and non-finite numbers, deep nesting, unicode edge cases, oversized strings and lists, unknown fields,
invalid JSON, empty bodies, other content types).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

# ---------------------------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    method: str
    path: str
    body: bytes | None
    content_type: str | None
    note: str  # "valid" or the mutation's name

    @property
    def route(self) -> str:
        return f"{self.method} {self.path}"

    def show(self, limit: int = 600) -> str:
        body = b"" if self.body is None else self.body
        text = body[:limit].decode("utf-8", "backslashreplace") + (f"... ({len(body)} bytes)" if len(body) > limit else "")
        return f"{self.route} [{self.note}] content-type={self.content_type!r} body={text}"


class Raw:
    """A JSON fragment written as is (``NaN``, ``1e999``, 10,000 nested brackets)."""

    def __init__(self, text: str):
        self.text = text


def dump(value: Any) -> bytes:
    """JSON with ``Raw`` fragments spliced in; lone surrogates come out as ``\\udXXX`` escapes (ensure_ascii)."""
    raws: list[str] = []

    def swap(v: Any) -> Any:
        if isinstance(v, Raw):
            raws.append(v.text)
            return f"\x00raw{len(raws) - 1}\x00"
        if isinstance(v, dict):
            return {k: swap(x) for k, x in v.items()}
        if isinstance(v, list):
            return [swap(x) for x in v]
        return v

    text = json.dumps(swap(value), allow_nan=True)
    for i, raw in enumerate(raws):
        text = text.replace(json.dumps(f"\x00raw{i}\x00"), raw)
    return text.encode("utf-8", "surrogatepass")


# ---------------------------------------------------------------------------------------------------- valid values
WORDS = st.sampled_from(["hello", "The", " answer", "42", "é", "\n", "{", "<|im_end|>", "tool", "a b c", ""])
TEXT = st.lists(WORDS, max_size=6).map("".join)
TOKEN_ID = st.integers(0, 49151)
REGEXES = [r"[a-z]{1,5}", r"(yes|no)", r"\d+\.\d{2}", r"[A-Z][a-z]*( [a-z]+){0,3}\.", r"(a|b)*c"]
EBNFS = ['root ::= "yes" | "no"', 'root ::= [0-9]+ ("," [0-9]+)*', 'root ::= item+\nitem ::= "a" | "b"']
JSON_SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
     "required": ["name"]},
    {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    {"type": "object", "properties": {"tag": {"enum": ["a", "b"]}, "n": {"type": "number", "minimum": 0}}},
    {"type": "string", "pattern": "^[a-z]{2,4}$"},
]


@st.composite
def tools(draw: Any) -> list[dict[str, Any]]:
    names = draw(st.lists(st.sampled_from(["get_weather", "search", "add", "noop"]), min_size=1, max_size=3,
                          unique=True))
    return [{"type": "function", "function": {
        "name": name, "description": draw(TEXT),
        "parameters": draw(st.sampled_from([{"type": "object", "properties": {}}, *JSON_SCHEMAS[:1],
                                            {"type": "object", "properties": {"q": {"type": "string"}},
                                             "required": ["q"]}]))}} for name in names]


TOOL_CHOICE = st.one_of(st.sampled_from(["auto", "none", "required"]),
                        st.builds(lambda n: {"type": "function", "function": {"name": n}},
                                  st.sampled_from(["get_weather", "search", "missing"])))
RESPONSE_FORMAT = st.one_of(
    st.just({"type": "text"}), st.just({"type": "json_object"}),
    st.builds(lambda s, strict: {"type": "json_schema", "json_schema": {"name": "out", "schema": s, "strict": strict}},
              st.sampled_from(JSON_SCHEMAS), st.booleans()))
STOP = st.one_of(st.none(), TEXT, st.lists(TEXT, max_size=4))
LOGIT_BIAS = st.dictionaries(TOKEN_ID.map(str), st.floats(-100, 100), max_size=4)
SMALL_MAX_TOKENS = st.integers(1, 8)  # generation is the cost of a case


@st.composite
def sampling_params(draw: Any) -> dict[str, Any]:
    """SGLang ``sampling_params`` (free-form in the schema: the engine validates them)."""
    grammar = draw(st.sampled_from([None, None, "regex", "ebnf", "json_schema"]))
    p = draw(st.fixed_dictionaries({}, optional={
        "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "top_k": st.sampled_from([-1, 1, 5]),
        "min_p": st.floats(0, 1), "frequency_penalty": st.floats(-2, 2), "presence_penalty": st.floats(-2, 2),
        "repetition_penalty": st.floats(0.5, 2), "stop": STOP, "stop_token_ids": st.lists(TOKEN_ID, max_size=3),
        "ignore_eos": st.booleans(), "skip_special_tokens": st.booleans(), "no_stop_trim": st.booleans(),
        "n": st.integers(1, 3), "logit_bias": LOGIT_BIAS, "seed": st.integers(0, 2**31),
        "spaces_between_special_tokens": st.booleans(), "min_new_tokens": st.integers(0, 2)}))
    p["max_new_tokens"] = draw(SMALL_MAX_TOKENS)
    if grammar == "regex":
        p["regex"] = draw(st.sampled_from(REGEXES))
    elif grammar == "ebnf":
        p["ebnf"] = draw(st.sampled_from(EBNFS))
    elif grammar == "json_schema":
        p["json_schema"] = json.dumps(draw(st.sampled_from(JSON_SCHEMAS)))
    return p


# Fields whose schema is free-form or whose range would make a case expensive: "Model.field" -> strategy.
OVERRIDES: dict[str, st.SearchStrategy] = {
    "ChatCompletionRequest.tools": tools(),
    "ChatCompletionRequest.tool_choice": TOOL_CHOICE,
    "ChatCompletionRequest.response_format": RESPONSE_FORMAT,
    "ChatCompletionRequest.max_tokens": SMALL_MAX_TOKENS,
    "ChatCompletionRequest.max_completion_tokens": SMALL_MAX_TOKENS,
    "ChatCompletionRequest.chat_template_kwargs": st.just({"enable_thinking": False}),
    "ChatMessage.tool_calls": st.just([{"id": "call_1", "type": "function",
                                        "function": {"name": "add", "arguments": "{\"a\": 1}"}}]),
    "CompletionRequest.max_tokens": SMALL_MAX_TOKENS,
    "CompletionRequest.prompt": st.one_of(TEXT.map(lambda t: t or "x"), st.lists(TEXT.map(lambda t: t or "x"),
                                                                                  min_size=1, max_size=3),
                                          st.lists(TOKEN_ID, min_size=1, max_size=8),
                                          st.lists(st.lists(TOKEN_ID, min_size=1, max_size=8), min_size=1, max_size=2)),
    "CompletionRequest.suffix": st.none(),
    "GenerateRequestBody.sampling_params": sampling_params(),
    "GenerateRequestBody.input_ids": st.one_of(st.lists(TOKEN_ID, min_size=1, max_size=8),
                                               st.lists(st.lists(TOKEN_ID, min_size=1, max_size=8), min_size=1,
                                                        max_size=2)),
    "GenerateRequestBody.token_ids_logprob": st.lists(TOKEN_ID, max_size=3),
    "GenerateRequestBody.logprob_start_len": st.integers(-1, 4),
    "GenerateRequestBody.rid": st.none(),  # rids must be unique among running requests: left to the server
    "DetokenizeRequest.tokens": st.lists(TOKEN_ID, max_size=16),
    "_SamplingFields.logit_bias": LOGIT_BIAS,
    "_SamplingFields.n": st.integers(1, 3),
    "_SamplingFields.stop": STOP,
    "_SamplingFields.stop_token_ids": st.lists(TOKEN_ID, max_size=3),
    "_SamplingFields.regex": st.sampled_from(REGEXES),
    "_SamplingFields.ebnf": st.sampled_from(EBNFS),
    "_SamplingFields.rid": st.none(),
    "_SamplingFields.min_tokens": st.integers(0, 1),
    "_SamplingFields.top_k": st.sampled_from([-1, 1, 5]),
}
SAMPLING_FIELDS = {"model", "n", "stop", "seed", "temperature", "top_p", "presence_penalty", "frequency_penalty",
                   "logit_bias", "stream", "stream_options", "user", "top_k", "min_p", "repetition_penalty",
                   "min_tokens", "ignore_eos", "stop_token_ids", "skip_special_tokens",
                   "spaces_between_special_tokens", "no_stop_trim", "regex", "ebnf", "rid"}
EXCLUSIVE = ("regex", "ebnf", "response_format")


class Schemas:
    """Hypothesis strategies for the JSON values a schema of ``spec`` (an OpenAPI document) accepts."""

    def __init__(self, spec: dict[str, Any]):
        self.components = spec.get("components", {}).get("schemas", {})

    def resolve(self, schema: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        if "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[-1]
            return name, self.components[name]
        return None, schema

    def valid(self, schema: dict[str, Any], owner: str | None = None) -> st.SearchStrategy:
        name, schema = self.resolve(schema)
        owner = name or owner
        if "anyOf" in schema:
            return st.one_of([self.valid(s, owner) for s in schema["anyOf"]])
        if "const" in schema:
            return st.just(schema["const"])
        if "enum" in schema:
            return st.sampled_from(schema["enum"])
        kind = schema.get("type")
        if kind == "object":
            return self._object(schema, owner)
        if kind == "array":
            items = self.valid(schema.get("items", {}), owner)
            return st.lists(items, min_size=schema.get("minItems", 0), max_size=min(schema.get("maxItems", 4), 4))
        if kind == "string":
            return TEXT
        if kind == "integer":
            lo, hi = schema.get("minimum", -5), schema.get("maximum", 100)
            return st.integers(lo, max(lo, hi))
        if kind == "number":
            lo = schema.get("minimum", schema.get("exclusiveMinimum", -2.0))
            hi = schema.get("maximum", schema.get("exclusiveMaximum", 2.0))
            return st.floats(lo, max(lo, hi), exclude_min="exclusiveMinimum" in schema,
                             exclude_max="exclusiveMaximum" in schema, allow_nan=False)
        if kind == "boolean":
            return st.booleans()
        if kind == "null":
            return st.none()
        return st.from_type(int) | TEXT | st.none()  # {} : anything

    def _object(self, schema: dict[str, Any], owner: str | None) -> st.SearchStrategy:
        props = schema.get("properties")
        if props is None:
            extra = schema.get("additionalProperties", True)
            values = self.valid(extra, owner) if isinstance(extra, dict) else (TEXT | st.integers(-3, 3))
            return st.dictionaries(TEXT, values, max_size=3)
        required = set(schema.get("required", []))

        def field(prop: str) -> st.SearchStrategy:
            group = "_SamplingFields" if prop in SAMPLING_FIELDS else owner
            for key in (f"{owner}.{prop}", f"{group}.{prop}"):
                if key in OVERRIDES:
                    return OVERRIDES[key]
            return self.valid(props[prop], owner)

        strategy = st.fixed_dictionaries({p: field(p) for p in props if p in required},
                                         optional={p: field(p) for p in props if p not in required})
        return strategy.map(_consistent)


def _consistent(body: dict[str, Any]) -> dict[str, Any]:
    """What a valid body needs beyond its schema: at most one constraint (regex, ebnf, response_format, tools),
    a tool_choice naming one of the tools, top_logprobs only with logprobs, and a small token budget."""
    present = [k for k in (*EXCLUSIVE, "tools") if body.get(k)]
    for key in present[1:]:
        del body[key]
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and body.get("tools"):
        choice["function"]["name"] = body["tools"][0]["function"]["name"]
    if body.get("top_logprobs") and body.get("logprobs") is not True:
        body["logprobs"] = True
    if "messages" in body or "prompt" in body:
        body.setdefault("max_tokens", 4)
    return body


# ---------------------------------------------------------------------------------------------------- mutations
NON_FINITE = [Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1e999"), Raw("-1e999")]
EXTREME_NUMBERS = [0, -1, -(2**31), 2**31, 2**63, 2**64, 10**30, -(10**30), 1e308, -1e308, 5e-324, 0.5, -0.0]
UNICODE = ["\ud800", "\udfff", "a\ud800b", "\x00", "nul\x00inside", "\u202e\u200f\u202d", "👩‍👩‍👧‍👦🏳️‍🌈",
           "e\u0301\u0301\u0301", "\ufeff", "\uffff\ufffe", "\U0010ffff", "\x7f\x1b[31m", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢" * 20]
WRONG_TYPES = [None, True, False, 0, -7, 3.5, "", "x", [], [1, "a"], {}, {"a": {"b": []}}]
BAD_JSON = [b"{", b"}", b"{\"a\":}", b"{\"messages\": [", b"not json", b"\xff\xfe\x00{", b"{\"a\": 1}}",
            b"{'single': 'quotes'}", b"[" * 100, b"\"\\ud800\"", b"{\"a\":\"\\x\"}", b"null", b"[]", b"1", b"\"s\""]
CONTENT_TYPES = [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                 "application/json; charset=latin-1", "application/octet-stream", "*/*", "application/json"]
DEEP = 10_000


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every location in a JSON value (keys and list indexes), outermost first."""
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, prefix + (i,))
    return out


def _set(value: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = new if len(path) == 1 else _set(copy[path[0]], path[1:], new)
    return copy


def _delete(value: Any, path: tuple) -> Any:
    if len(path) == 1:
        copy = dict(value) if isinstance(value, dict) else list(value)
        del copy[path[0]]
        return copy
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _delete(copy[path[0]], path[1:])
    return copy


def _get(value: Any, path: tuple) -> Any:
    for p in path:
        value = value[p]
    return value


@st.composite
def mutate(draw: Any, body: dict[str, Any], schema_props: dict[str, Any]) -> tuple[bytes | None, str | None, str]:
    """(body bytes, content type, the mutation's name) of a mutated ``body``."""
    kind = draw(st.sampled_from(["wrong_type", "missing_field", "extreme_number", "non_finite", "deep_nesting",
                                 "unicode", "oversized_string", "invalid_json", "empty_body", "content_type",
                                 "unknown_field", "huge_list"]))
    paths = _paths(body) or [()]
    # a known top-level field half the time (even one the valid body left out), else anywhere in the body
    if schema_props and draw(st.booleans()):
        path: tuple = (draw(st.sampled_from(sorted(schema_props))),)
    else:
        path = draw(st.sampled_from(paths))
    content_type = "application/json"
    if kind == "wrong_type":
        value: Any = _set(body, path, draw(st.sampled_from(WRONG_TYPES)))
    elif kind == "missing_field":
        value = _delete(body, path) if path and _exists(body, path) else {}
    elif kind == "extreme_number":
        value = _set(body, path, draw(st.sampled_from(EXTREME_NUMBERS)))
    elif kind == "non_finite":
        value = _set(body, path, draw(st.sampled_from(NON_FINITE)))
    elif kind == "deep_nesting":
        depth = draw(st.sampled_from([100, 1000, DEEP]))
        value = _set(body, path, Raw("[" * depth + "]" * depth))
    elif kind == "unicode":
        value = _set(body, path, draw(st.sampled_from(UNICODE)))
    elif kind == "oversized_string":
        value = _set(body, path, draw(st.sampled_from(["x", "hello ", "😀", "\u0301"])) * draw(
            st.sampled_from([10_000, 200_000])))
    elif kind == "huge_list":
        value = _set(body, path, [draw(st.sampled_from([0, 1, "a", {"role": "user", "content": "x"}]))] * 20_000)
    elif kind == "unknown_field":
        value = dict(body, **{draw(st.sampled_from(["foo", "__proto__", "", "max_tokens ", "ñ\u0000"])):
                              draw(st.sampled_from(WRONG_TYPES))})
    elif kind == "invalid_json":
        return draw(st.sampled_from(BAD_JSON)), content_type, kind
    elif kind == "empty_body":
        return draw(st.sampled_from([b"", None])), draw(st.sampled_from(CONTENT_TYPES)), kind
    else:  # content_type: the valid body sent as something else
        return dump(body), draw(st.sampled_from(CONTENT_TYPES)), kind
    return dump(value), content_type, kind


def _exists(body: Any, path: tuple) -> bool:
    try:
        _get(body, path)
        return True
    except (KeyError, IndexError, TypeError):
        return False


@st.composite
def cases(draw: Any, spec: dict[str, Any], routes: list[tuple[str, str]] | None = None) -> Case:
    """One call to one of ``routes`` ((method, path) pairs, default: every route of ``spec``)."""
    schemas = Schemas(spec)
    method, path = draw(st.sampled_from(routes or operations(spec)))
    request = spec["paths"][path][method.lower()].get("requestBody")
    if request is None:  # no body: send junk anyway, or nothing
        body = draw(st.sampled_from([None, b"", b"{}", b"garbage", b"{\"a\": NaN}"]))
        return Case(method, path, body, draw(st.sampled_from(CONTENT_TYPES)), "no_body_route")
    schema = request["content"]["application/json"]["schema"]
    value = draw(schemas.valid(schema))
    if draw(st.booleans()):
        return Case(method, path, dump(value), "application/json", "valid")
    props = schemas.resolve(schema)[1].get("properties", {})
    body, content_type, note = draw(mutate(value, props))
    return Case(method, path, body, content_type, note)


def operations(spec: dict[str, Any]) -> list[tuple[str, str]]:
    """Every (METHOD, path) of the spec but the docs' own."""
    return [(method.upper(), path) for path, ops in spec["paths"].items() for method in ops
            if not path.startswith(("/docs", "/redoc", "/openapi"))]
