"""Waiting for engine requests from HTTP handlers: several streams merged, results gathered, and a client that
goes away aborting what it asked for (its KV cache is freed at once)."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import Request

    from radixlm.engine.engine import Engine
    from radixlm.engine.request_state import RequestState

# How often a handler that is not streaming checks whether its client is still connected.
DISCONNECT_POLL_S = 0.5


class ClientDisconnected(Exception):
    """The client closed the connection; its requests have been aborted."""


# JSON has no infinities: a logprob of -inf (a token that a grammar, top-k/min-p or logit_bias rules out, yet in a
# top-k list or asked for by id) is written as OpenAI writes it, -9999.0.
LOGPROB_FLOOR = -9999.0


def json_text(obj: Any, separators: tuple[str, str] | None = None) -> str:
    """``obj`` as strict JSON (what every client parses): -inf/+inf become -/+``LOGPROB_FLOOR``, NaN null."""
    try:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=separators)
    except ValueError:  # only non-finite floats get here; the walk is paid by the rare answer that has one
        return json.dumps(_finite(obj), ensure_ascii=False, allow_nan=False, separators=separators)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else math.copysign(-LOGPROB_FLOOR, obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def sse(obj: Any) -> str:
    return f"data: {json_text(obj)}\n\n"


async def merge_streams(engine: "Engine", states: list["RequestState"]) -> AsyncIterator[tuple[int, dict]]:
    """Chunks of several requests as they come, as ``(index in states, chunk)``.  Leaving early (a client
    disconnect cancels the consumer) aborts the requests that have not finished."""
    queue: asyncio.Queue[tuple[int, dict | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, state: "RequestState") -> None:
        try:
            async for piece in engine.stream_state(state):
                queue.put_nowait((i, piece))
            queue.put_nowait((i, None))
        except Exception as e:  # the engine died: hand the error to the consumer
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(states)]
    try:
        remaining = len(states)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()  # a pump still running aborts its request on cancellation
        await asyncio.gather(*tasks, return_exceptions=True)


async def wait_all(engine: "Engine", states: list["RequestState"], raw: "Request | None") -> list[dict[str, Any]]:
    """The results of ``states`` in order; if the client disconnects first, abort them all and raise."""
    gathered = asyncio.ensure_future(asyncio.gather(*(engine.wait_state(s) for s in states)))
    try:
        while True:
            done, _ = await asyncio.wait({gathered}, timeout=DISCONNECT_POLL_S)
            if done:
                return gathered.result()
            if raw is not None and await raw.is_disconnected():
                raise ClientDisconnected()
    finally:
        if not gathered.done():
            gathered.cancel()  # each wait_state aborts its request when cancelled
            await asyncio.gather(gathered, return_exceptions=True)
