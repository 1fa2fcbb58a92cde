"""The soak test's request mix (``bench/soak.py``): one coroutine per kind of request, each returning an
``Outcome`` and, for a deterministic answer (greedy, or sampled with a seed), a ``Replay`` that sends the same
request again; plus a minimal raw HTTP client for what the ``openai`` client cannot do (the native routes, and
dropping a connection at an exact point of a stream)."""

from __future__ import annotations

import asyncio
import json
import random
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import openai

REQUEST_TIMEOUT_S = 120.0  # per request: longer means the server hung (under this load a request takes seconds)
LONG_TOKENS = 128  # requests meant to be cut short (disconnects, aborts) ask for this many

SUBJECTS = ["the ocean", "a small robot", "Paris", "prime numbers", "the moon", "a red bicycle", "coffee",
            "photosynthesis", "a lighthouse keeper", "the number seven", "winter", "an old library", "volcanoes",
            "a chess game", "the internet", "bees", "a rainy Tuesday", "gravity", "a jazz band", "tea"]
TASKS = ["Write one sentence about {}.", "Give me a fact about {}.", "Describe {} in a few words.",
         "What is interesting about {}?", "Tell a very short story about {}."]
STOPS = [["."], ["\n"], [","], [" the"], ["!", "?"]]
REGEXES = [r"(yes|no)", r"[0-9]{1,3}", r"[A-Z][a-z]{2,8}", r"(red|green|blue) (cat|dog)"]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}

# Malformed or invalid requests: each must get a 400 with an OpenAI-style error body, and nothing else changes.
BAD_REQUESTS: list[tuple[str, Any]] = [
    ("/v1/chat/completions", b"{not json"),
    ("/v1/chat/completions", {"model": "m", "messages": []}),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}}),
    ("/v1/completions", {"model": "m", "prompt": "x", "n": 0}),
    ("/v1/completions", {"model": "m", "prompt": "x", "regex": "([a-z]"}),
    ("/v1/completions", {"model": "m", "prompt": [1, 2, 10**9]}),
    ("/v1/completions", {"model": "m", "prompt": "x", "max_tokens": 10**7}),
    ("/generate", {"text": "x", "sampling_params": {"temperature": -1}}),
    ("/generate", {"text": "x", "sampling_params": {"ebnf": "root ::= "}}),
    ("/generate", {"text": "x", "input_ids": [1, 2]}),
    ("/generate", {"text": "x", "sampling_params": {"json_schema": "{not json"}}),
    ("/generate", {"text": "x", "sampling_params": {"max_new_tokens": "many"}}),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}],
                              "chat_template_kwargs": {"continue_final_message": True}}),
    ("/abort_request", {}),
]


# ---------------------------------------------------------------------------------------------------- raw HTTP
class HttpError(Exception):
    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status, self.body = status, body


class RawHttp:
    """A minimal HTTP/1.1 client on asyncio streams (one connection per request), so that a test can drop a
    connection at an exact point of a stream."""

    def __init__(self, base: str, api_key: str | None):
        parts = urllib.parse.urlsplit(base)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def _open(self, method: str, path: str, body: Any) -> tuple[int, dict[str, str], asyncio.StreamReader,
                                                                       asyncio.StreamWriter]:
        data = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else b"")
        reader, writer = await asyncio.open_connection(self.host, self.port)
        head = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}", "Content-Type: application/json",
                f"Content-Length: {len(data)}", "Connection: close", *(f"{k}: {v}" for k, v in self.auth.items())]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        headers = {}
        while line := (await reader.readline()).decode().strip():
            key, _, value = line.partition(":")
            headers[key.lower()] = value.strip()
        return status, headers, reader, writer

    @staticmethod
    async def _chunks(headers: dict[str, str], reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
        if headers.get("transfer-encoding") == "chunked":
            while size := int((await reader.readline()).strip() or b"0", 16):
                yield await reader.readexactly(size)
                await reader.readline()
        elif "content-length" in headers:
            yield await reader.readexactly(int(headers["content-length"]))
        else:
            while piece := await reader.read(65536):
                yield piece

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """(status, parsed JSON body)."""
        status, headers, reader, writer = await self._open(method, path, body)
        try:
            data = b"".join([c async for c in self._chunks(headers, reader)])
        finally:
            writer.close()
        return status, json.loads(data) if data else None

    async def stream(self, path: str, body: Any) -> AsyncIterator[dict[str, Any]]:
        """The ``data:`` events of a server-sent-event response; leaving the loop closes the connection."""
        status, headers, reader, writer = await self._open("POST", path, body)
        try:
            if status != 200:
                data = b"".join([c async for c in self._chunks(headers, reader)])
                raise HttpError(status, data.decode(errors="replace"))
            buffer = b""
            async for piece in self._chunks(headers, reader):
                buffer += piece
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    line = event.decode()
                    if line.startswith("data: ") and line != "data: [DONE]":
                        yield json.loads(line[len("data: "):])
        finally:
            writer.close()


# ---------------------------------------------------------------------------------------------------- the mix
@dataclass
class Outcome:
    kind: str
    result: str  # "ok", or the expected error's name ("400", "aborted", "disconnected"), or "FAIL: ..."
    replay: "Replay | None" = None


@dataclass
class Replay:
    """A deterministic request and the answer it got under load; ``run`` sends it again."""
    kind: str
    run: Callable[[], Awaitable[Any]]
    answer: Any


class Clients:
    def __init__(self, base: str, api_key: str | None):
        self.openai = openai.AsyncOpenAI(base_url=base + "/v1", api_key=api_key or "unused", max_retries=0,
                                         timeout=REQUEST_TIMEOUT_S)
        self.http = RawHttp(base, api_key)


def _prompt(rng: random.Random) -> str:
    return rng.choice(TASKS).format(rng.choice(SUBJECTS))


def _chat_answer(resp: Any) -> list[Any]:
    out = []
    for c in resp.choices:
        lps = ([(t.token, t.logprob, [(a.token, a.logprob) for a in t.top_logprobs]) for t in c.logprobs.content]
               if c.logprobs and c.logprobs.content else None)
        out.append((c.index, c.message.content, c.finish_reason, lps))
    return out


async def chat(c: Clients, rng: random.Random) -> Outcome:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": _prompt(rng)}],
                            "max_tokens": rng.randint(4, 16), "temperature": 0}
    if rng.random() < 0.3:
        body.update(logprobs=True, top_logprobs=rng.randint(1, 3))
    if rng.random() < 0.3:
        body["stop"] = rng.choice(STOPS)

    async def run() -> Any:
        return _chat_answer(await c.openai.chat.completions.create(**body))
    return Outcome("chat", "ok", Replay("chat", run, await run()))


async def chat_stream(c: Clients, rng: random.Random) -> Outcome:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "system", "content": "Be brief."},
                                                       {"role": "user", "content": _prompt(rng)}],
                            "max_tokens": rng.randint(4, 16), "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}}
    if rng.random() < 0.3:
        body["stop"] = rng.choice(STOPS)

    async def run() -> Any:
        text, reason, usage = "", None, None
        async for chunk in await c.openai.chat.completions.create(**body):
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
            for ch in chunk.choices:
                text += ch.delta.content or ""
                reason = ch.finish_reason or reason
        return text, reason, usage
    return Outcome("chat_stream", "ok", Replay("chat_stream", run, await run()))


async def chat_json(c: Clients, rng: random.Random) -> Outcome:
    body = {"model": "m", "messages": [{"role": "user", "content": f"Invent a person who likes {rng.choice(SUBJECTS)}."
                                                                      " Reply as JSON."}],
            "max_tokens": 40, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}}

    async def run() -> Any:
        return _chat_answer(await c.openai.chat.completions.create(**body))
    answer = await run()
    _, content, reason, _ = answer[0]
    if reason == "stop":
        value = json.loads(content)  # a finished constrained answer must be valid
        if set(value) != {"name", "age"}:
            return Outcome("chat_json", f"FAIL: output does not follow the schema: {content!r}")
    return Outcome("chat_json", "ok", Replay("chat_json", run, answer))


async def completion(c: Clients, rng: random.Random) -> Outcome:
    body: dict[str, Any] = {"model": "m", "prompt": _prompt(rng), "max_tokens": rng.randint(4, 16), "temperature": 0}
    if rng.random() < 0.5:
        body["stop"] = rng.choice(STOPS)
    if rng.random() < 0.3:
        body["logprobs"] = rng.randint(0, 3)
    if rng.random() < 0.2:
        body["extra_body"] = {"regex": rng.choice(REGEXES)}

    async def run() -> Any:
        resp = await c.openai.completions.create(**body)
        return [(ch.index, ch.text, ch.finish_reason,
                 (ch.logprobs.tokens, ch.logprobs.token_logprobs, ch.logprobs.top_logprobs) if ch.logprobs else None)
                for ch in resp.choices]
    return Outcome("completion", "ok", Replay("completion", run, await run()))


async def completion_stream(c: Clients, rng: random.Random) -> Outcome:
    body: dict[str, Any] = {"model": "m", "prompt": _prompt(rng), "max_tokens": rng.randint(4, 16), "temperature": 0,
                            "stream": True}
    if rng.random() < 0.5:
        body["stop"] = rng.choice(STOPS)

    async def run() -> Any:
        text, reason = "", None
        async for chunk in await c.openai.completions.create(**body):
            for ch in chunk.choices:
                text += ch.text
                reason = ch.finish_reason or reason
        return text, reason
    return Outcome("completion_stream", "ok", Replay("completion_stream", run, await run()))


async def completion_n(c: Clients, rng: random.Random) -> Outcome:
    """n > 1 sampled with a seed: deterministic too (each copy's seed is seed + its index)."""
    body = {"model": "m", "prompt": _prompt(rng), "max_tokens": rng.randint(4, 12), "n": rng.randint(2, 3),
            "temperature": 0.8, "top_p": 0.95, "seed": rng.randrange(10**6)}

    async def run() -> Any:
        resp = await c.openai.completions.create(**body)
        return sorted((ch.index, ch.text, ch.finish_reason) for ch in resp.choices)
    answer = await run()
    if len(answer) != body["n"]:
        return Outcome("completion_n", f"FAIL: {len(answer)} choices for n={body['n']}")
    return Outcome("completion_n", "ok", Replay("completion_n", run, answer))


def _native_body(rng: random.Random) -> dict[str, Any]:
    count = rng.choice([1, 1, 2])
    params: dict[str, Any] = {"max_new_tokens": rng.randint(4, 16), "temperature": 0}
    if rng.random() < 0.3:
        params["regex"] = rng.choice(REGEXES)
    if rng.random() < 0.3:
        params["stop"] = rng.choice(STOPS)
    body: dict[str, Any] = {"text": _prompt(rng) if count == 1 else [_prompt(rng) for _ in range(count)],
                            "sampling_params": params}
    if rng.random() < 0.4:
        body.update(return_logprob=True, top_logprobs_num=rng.randint(1, 3))
    return body


def _native_answer(result: dict[str, Any]) -> Any:
    meta = result["meta_info"]
    return (result["text"], result["output_ids"], meta["finish_reason"], meta.get("output_token_logprobs"),
            meta.get("output_top_logprobs"))


async def native(c: Clients, rng: random.Random) -> Outcome:
    body = _native_body(rng)

    async def run() -> Any:
        status, out = await c.http.request("POST", "/generate", body)
        if status != 200:
            raise HttpError(status, json.dumps(out))
        return [_native_answer(r) for r in (out if isinstance(out, list) else [out])]
    return Outcome("native", "ok", Replay("native", run, await run()))


async def native_stream(c: Clients, rng: random.Random) -> Outcome:
    body = {**_native_body(rng), "text": _prompt(rng), "stream": True}

    async def run() -> Any:
        text, ids, last = "", [], None
        async for chunk in c.http.stream("/generate", body):
            # SGLang's native stream: cumulative text and ids
            text, ids, last = chunk["text"], chunk["output_ids"], chunk
        return text, ids, last["meta_info"]["finish_reason"], last["meta_info"].get("output_token_logprobs")
    return Outcome("native_stream", "ok", Replay("native_stream", run, await run()))


async def disconnect_stream(c: Clients, rng: random.Random) -> Outcome:
    """Read a few chunks of a long stream, then close the connection (the server must abort and free it)."""
    keep = rng.randint(1, 4)
    if rng.random() < 0.5:
        path, body = "/generate", {"text": _prompt(rng), "stream": True,
                                   "sampling_params": {"max_new_tokens": LONG_TOKENS, "ignore_eos": True}}
    else:
        path, body = "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": _prompt(rng)}],
                                              "max_tokens": LONG_TOKENS, "stream": True, "ignore_eos": True}
    seen = 0
    async for _ in c.http.stream(path, body):
        seen += 1
        if seen >= keep:
            break
    return Outcome("disconnect_stream", "disconnected" if seen >= keep else "FAIL: the stream ended early")


async def disconnect_wait(c: Clients, rng: random.Random) -> Outcome:
    """Give up on a long non-streaming request before it finishes (the server notices and aborts it)."""
    body = {"text": _prompt(rng), "sampling_params": {"max_new_tokens": LONG_TOKENS, "ignore_eos": True}}
    try:
        await asyncio.wait_for(c.http.request("POST", "/generate", body), timeout=rng.uniform(0.2, 1.0))
    except asyncio.TimeoutError:
        return Outcome("disconnect_wait", "disconnected")
    return Outcome("disconnect_wait", "finished first")


async def abort(c: Clients, rng: random.Random) -> Outcome:
    """A long request stopped through ``/abort_request`` by its rid once it has started streaming (so the abort
    cannot overtake it): its last chunk has finish reason abort."""
    rid = f"soak-{rng.getrandbits(64):016x}"
    body = {"text": _prompt(rng), "rid": rid, "stream": True,
            "sampling_params": {"max_new_tokens": LONG_TOKENS, "ignore_eos": True}}
    last = None
    async for chunk in c.http.stream("/generate", body):
        if last is None:
            await asyncio.sleep(rng.uniform(0.0, 0.5))
            status, reply = await c.http.request("POST", "/abort_request", {"rid": rid})
            if status != 200:
                return Outcome("abort", f"FAIL: /abort_request answered {status}: {reply}")
        last = chunk
    reason = last["meta_info"]["finish_reason"] if last else None
    if reason and reason["type"] == "abort":
        return Outcome("abort", "aborted")
    return Outcome("abort", "finished first" if reason and reason["type"] == "length" else f"FAIL: finish {reason}")


async def unsatisfiable_grammar(c: Clients, rng: random.Random) -> Outcome:
    """A grammar that parses but matches nothing fails when the scheduler compiles it: a 400 naming it."""
    body = {"text": _prompt(rng), "sampling_params": {"ebnf": "root ::= a\na ::= a", "max_new_tokens": 8},
            "return_logprob": True, "top_logprobs_num": 2}
    status, out = await c.http.request("POST", "/generate", body)
    if status == 400 and "matches no text" in out["error"]["message"]:
        return Outcome("unsatisfiable_grammar", "400")
    return Outcome("unsatisfiable_grammar", f"FAIL: answered {status}: {str(out)[:200]}")


async def bad_request(c: Clients, rng: random.Random) -> Outcome:
    path, body = rng.choice(BAD_REQUESTS)
    try:
        status, reply = await c.http.request("POST", path, body)
    except json.JSONDecodeError:
        return Outcome("bad_request", f"FAIL: {path} {str(body)[:80]} answered something that is not JSON")
    well_formed = isinstance(reply, dict) and isinstance(reply.get("error"), dict) and "message" in reply["error"]
    if status == 400 and well_formed:
        return Outcome("bad_request", "400")
    return Outcome("bad_request", f"FAIL: {path} {str(body)[:80]} answered {status}: {str(reply)[:200]}")


KINDS: dict[str, tuple[float, Callable[[Clients, random.Random], Awaitable[Outcome]]]] = {
    "chat": (3, chat), "chat_stream": (3, chat_stream), "chat_json": (1, chat_json),
    "completion": (2, completion), "completion_stream": (2, completion_stream), "completion_n": (1, completion_n),
    "native": (2, native), "native_stream": (1, native_stream),
    "disconnect_stream": (1, disconnect_stream), "disconnect_wait": (0.5, disconnect_wait), "abort": (1, abort),
    "unsatisfiable_grammar": (0.3, unsatisfiable_grammar), "bad_request": (3, bad_request),
}
