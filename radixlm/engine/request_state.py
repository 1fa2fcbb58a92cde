"""What the front end knows about one in-flight request, and how its chunks reach whoever waits for them.

The receiver thread produces chunks; a consumer is either a plain thread (offline ``Engine.generate``) or an
asyncio task (``async_generate``, the HTTP server).  Asyncio consumers get their chunks through
``loop.call_soon_threadsafe`` so that thousands of waiting streams cost no threads.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from radixlm.engine.detokenizer import RequestDecoder
from radixlm.errors import InvalidRequestError


class EngineUnavailableError(RuntimeError):
    """The engine takes no new request now (HTTP 503).  ``retry_after``: seconds after which a retry may succeed
    (its queue is full, or the server drains and its load balancer sends the retry elsewhere); None when it will not
    (the engine is dead)."""

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineDeadError(EngineUnavailableError):
    """The scheduler is gone or the engine is shut down: no request can be answered any more (HTTP 503)."""


class RequestFailedError(RuntimeError):
    """The engine failed this request after accepting it: the scheduler crashed, hung or was killed while it was in
    flight, or delivering its output raised (HTTP 500; the message names the error, the log has the traceback)."""


def raise_if_rejected(finished_reason: dict[str, Any] | None) -> None:
    """Raise the InvalidRequestError the scheduler found (an abort with ``status_code`` 400: a grammar that does not
    compile, or not in time), so that callers see it exactly like one found before submission."""
    if finished_reason and finished_reason.get("type") == "abort" and finished_reason.get("status_code") == 400:
        raise InvalidRequestError(finished_reason.get("message", "invalid request"), finished_reason.get("param"))


@dataclass
class RequestState:
    rid: str
    decoder: RequestDecoder
    prompt_tokens: int
    created: float
    loop: asyncio.AbstractEventLoop | None = None  # set: chunks go to `aqueue` on this loop
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finished_reason: dict[str, Any] | None = None
    cached_tokens: int = 0
    logprobs: dict[str, list] | None = None  # accumulated SGLang-style logprob fields, when asked for
    hidden_states: list[list[float]] | None = None  # final hidden state behind each output token, when asked for
    error: str | None = None  # why the engine failed the request before it finished
    lora_name: str | None = None  # its LoRA adapter (None: the base model); an unload waits for it
    chunks: "queue.Queue[dict[str, Any]]" = field(default_factory=queue.Queue)
    aqueue: "asyncio.Queue[dict[str, Any]] | None" = None
    done: threading.Event = field(default_factory=threading.Event)
    on_finish: Callable[[], None] | None = None  # e.g. release the n copies waiting on a shared prompt
    last_token_time: float = 0.0  # arrival of the latest output token (inter-token latency)

    def __post_init__(self) -> None:
        if self.loop is not None:
            self.aqueue = asyncio.Queue()

    @property
    def finished(self) -> bool:
        return self.finished_reason is not None or self.error is not None

    def meta_info(self, logprobs: dict[str, list] | None = None) -> dict[str, Any]:
        meta = {"id": self.rid, "prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.output_ids),
                "cached_tokens": self.cached_tokens, "finish_reason": self.finished_reason,
                "e2e_latency": time.time() - self.created}
        meta.update(logprobs if logprobs is not None else self.logprobs or {})
        if self.hidden_states is not None:
            meta["hidden_states"] = self.hidden_states
        return meta

    def add_logprobs(self, new: dict[str, list]) -> dict[str, list]:
        """Append a scheduler delta (entries (logprob, id)) as SGLang's [logprob, id, None]; return the delta."""
        delta = {key: [_entry(e) for e in entries] for key, entries in new.items()}
        for key, entries in delta.items():
            self.logprobs.setdefault(key, []).extend(entries)
        return delta

    def result(self) -> dict[str, Any]:
        if self.error is not None:
            raise RequestFailedError(self.error)
        raise_if_rejected(self.finished_reason)
        return {"text": self.text, "output_ids": list(self.output_ids), "meta_info": self.meta_info()}

    # ------------------------------------------------------------------ delivery (called by the receiver thread)
    def deliver(self, chunk: dict[str, Any]) -> None:
        """Hand a chunk to the consumer; after the last one (finished or failed) mark the request done."""
        if self.loop is not None:
            try:
                self.loop.call_soon_threadsafe(self.aqueue.put_nowait, chunk)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
                pass
        else:
            self.chunks.put(chunk)
        if self.finished:
            self.done.set()

    def fail(self, message: str) -> None:
        self.error = message
        self.deliver({"error": message})

    async def next_chunk(self, timeout: float | None = None) -> dict[str, Any]:
        """The next chunk for an asyncio consumer; raises ``RequestFailedError`` if the engine failed it, and
        ``InvalidRequestError`` if the scheduler rejected the request (``raise_if_rejected``)."""
        chunk = await asyncio.wait_for(self.aqueue.get(), timeout)
        if "error" in chunk:
            raise RequestFailedError(chunk["error"])
        raise_if_rejected(chunk["meta_info"]["finish_reason"])
        return chunk


def _entry(e: Any) -> Any:
    """(logprob, id) -> [logprob, id, None]; lists of them (top-k) recursively; None stays None."""
    if e is None:
        return None
    if isinstance(e, tuple):
        return [e[0], e[1], None]
    return [_entry(x) for x in e]
