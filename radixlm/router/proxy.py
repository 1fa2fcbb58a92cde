"""Forwarding a client's request to a worker: the routing text of a body, the choice of a worker with retries, and
the relay of the worker's response (streamed, unbuffered).

Retry contract: a try fails when the worker's connection fails (refused, reset, timed out before the response
head) or it answers 5xx; the request then goes to another healthy worker not tried yet, at most ``1 + retries``
tries in all.  A refused or broken connection also takes the worker out of the candidates until it passes its
health checks again (``workers.HealthChecks``).  Once the response head of a 2xx-4xx answer is taken, the request
is never retried: the status and body reach the client as the worker sent them.  A body of known length (a JSON
answer) is read whole and relayed as one response; any other (an SSE stream) chunk by chunk as it arrives.  A
worker failing after the head truncates the response: a body of known length becomes a 502; an SSE stream ends
with an error event (``data: {"error": ...}``) and ``data: [DONE]``, as the workers' own streams do; any other
body is cut (the client sees an incomplete chunked body).

A client that leaves ends its worker's request: before the response head, waiting on the worker is cancelled
(aiohttp closes the worker's connection); after it, the relay drops the worker's connection instead of returning
it to the pool.  The worker sees its connection close (radixlm workers abort the request and free its KV cache).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from starlette.responses import Response, StreamingResponse

from radixlm.errors import error_body
from radixlm.router.workers import WorkerSet

logger = logging.getLogger(__name__)

# Response headers that describe one hop's connection or encoding, not the answer: never relayed.
HOP_HEADERS = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server",
                         "proxy-authenticate", "proxy-connection", "te", "trailer", "upgrade"})
# Request headers relayed to a worker (the body's type and what the client accepts; authorization is set apart).
FORWARDED_REQUEST_HEADERS = ("content-type", "accept")


def error_response(status: int, message: str, param: str | None = None) -> Response:
    return Response(json.dumps(error_body(message, status, param)), status_code=status,
                    media_type="application/json")


def routing_text(path: str, body: Any) -> str:
    """The text the policy routes by: ``/generate``'s ``text`` (a batch's texts joined by newlines; with only
    ``input_ids``, the ids as decimal numbers joined by spaces, so that shared id prefixes still match); a chat's
    messages in order, each as ``role: content`` on its own line (text parts concatenated; roles included, so that
    the same words from different speakers differ); a completion's prompt (as ``/generate``'s text).  Anything
    else, or a field of an unexpected type (the worker answers it with a 400), routes as the empty text.

    A request under a LoRA adapter (``/generate``'s ``lora_path``, one or one per prompt; an OpenAI ``model`` of
    the form ``<base>:<adapter>``) routes by its text behind ``"\0lora:<adapter(s)>\0"``: a worker caches KV per
    adapter, so the same prompt under another adapter (or none) shares no prefix with it."""
    text = _request_text(path, body)
    adapter = _adapter_key(path, body)
    return f"\0lora:{adapter}\0{text}" if adapter else text


def _adapter_key(path: str, body: Any) -> str:
    if not isinstance(body, dict):
        return ""
    if path in ("/v1/chat/completions", "/v1/completions"):
        model = body.get("model")
        return model if isinstance(model, str) and ":" in model else ""
    if path == "/generate":
        lora = body.get("lora_path")
        if isinstance(lora, str):
            return lora
        if isinstance(lora, list) and any(isinstance(name, str) for name in lora):
            return "\n".join(name if isinstance(name, str) else "" for name in lora)
    return ""


def _request_text(path: str, body: Any) -> str:
    if not isinstance(body, dict):
        return ""
    if path == "/v1/chat/completions":
        messages = body.get("messages")
        if not isinstance(messages, list):
            return ""
        return "".join(f"{m.get('role', '')}: {_content_text(m.get('content'))}\n" for m in messages
                       if isinstance(m, dict))
    if path == "/v1/completions":
        return _prompt_text(body.get("prompt"))
    if path == "/generate":
        text = _prompt_text(body.get("text"))
        return text if text else _prompt_text(body.get("input_ids"))
    return ""


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, int) for p in prompt):
            return " ".join(map(str, prompt))
        return "\n".join(_prompt_text(p) for p in prompt)
    return ""


@dataclass
class ProxyStats:
    """Counters the router's /metrics reports: ``count(name, worker)`` with name ``decision`` (a try sent to the
    worker), ``retried`` (a try that failed before the response head: retried elsewhere while a worker is left),
    ``response`` (a response relayed), ``truncated`` (a relayed body that failed midway)."""

    count: Callable[[str, str], None]


class Proxy:
    """Forwards requests to the workers over one pooled ``aiohttp`` session."""

    def __init__(self, workers: WorkerSet, session: aiohttp.ClientSession, stats: ProxyStats, retries: int,
                 api_key: str | None) -> None:
        self.workers = workers
        self.session = session
        self.stats = stats
        self.retries = retries
        self.api_key = api_key

    def request_headers(self, client_headers: Any) -> dict[str, str]:
        """The headers sent to a worker: the body's type, and the router's API key (or, without one, the client's
        own ``Authorization``, for workers that check their own key)."""
        headers = {name: client_headers[name] for name in FORWARDED_REQUEST_HEADERS if name in client_headers}
        if self.api_key is not None:
            headers["authorization"] = f"Bearer {self.api_key}"
        elif "authorization" in client_headers:
            headers["authorization"] = client_headers["authorization"]
        return headers

    async def forward(self, method: str, path_qs: str, body: bytes, headers: dict[str, str], text: str,
                      route: Callable[[str, dict[str, int]], str],
                      client_gone: Callable[[], Awaitable[None]] | None = None) -> Response:
        """Send the request to the worker ``route(text, loads)`` picks among the healthy ones, retrying as the
        module says; the response relays the worker's.  ``client_gone()`` returns when the client disconnects:
        until the response head, the worker's request is cancelled then (and a 499 returned to nobody)."""
        tried: set[str] = set()
        failure: Response | None = None
        for _ in range(1 + self.retries):
            loads = self.workers.loads(exclude=tried)
            if not loads:
                break
            worker = route(text, loads)
            self.stats.count("decision", worker)
            tried.add(worker)
            self.workers.started(worker)
            try:
                response = await self._head(method, worker + path_qs, body, headers, client_gone)
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                self.workers.finished(worker)
                logger.warning("worker %s failed before answering %s (%s): trying another", worker, path_qs,
                               exc or type(exc).__name__)
                self.workers.set_healthy(worker, False)
                self.stats.count("retried", worker)
                failure = error_response(502, f"worker {worker} failed: {type(exc).__name__}: {exc}")
                continue
            except BaseException:
                self.workers.finished(worker)
                raise
            if response is None:
                self.workers.finished(worker)
                logger.info("the client left before worker %s answered %s: its request cancelled", worker, path_qs)
                return Response(status_code=499)
            if response.status >= 500:
                try:
                    content = await response.read()
                except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
                    content = json.dumps(error_body(f"worker {worker} answered {response.status}",
                                                    response.status)).encode()
                finally:
                    response.release()
                    self.workers.finished(worker)
                logger.warning("worker %s answered %s to %s: trying another", worker, response.status, path_qs)
                self.stats.count("retried", worker)
                failure = Response(content, status_code=response.status, headers=_relayed(response))
                continue
            if response.content_length is not None:
                return await self._whole(worker, response)
            self.stats.count("response", worker)
            return _RelayResponse(self._relay(worker, response), status_code=response.status,
                                  headers=_relayed(response), on_close=self._closer(worker, response))
        if failure is not None:
            return failure
        return error_response(503, "no healthy worker to serve the request")

    async def _head(self, method: str, url: str, body: bytes, headers: dict[str, str],
                    client_gone: Callable[[], Awaitable[None]] | None) -> aiohttp.ClientResponse | None:
        """The worker's response (its head taken, the body not yet read), or None when ``client_gone`` returned
        first: the request is then cancelled, which closes its connection."""
        if client_gone is None:
            return await self.session.request(method, url, data=body, headers=headers)
        head = asyncio.ensure_future(self.session.request(method, url, data=body, headers=headers))
        gone = asyncio.ensure_future(client_gone())
        try:
            await asyncio.wait((head, gone), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            head.cancel()
            raise
        finally:
            gone.cancel()
        if head.done():
            return head.result()  # the head came first (or with the disconnect): relayed as usual
        head.cancel()
        await asyncio.wait((head,))  # the cancellation done: the worker's connection closed
        if not head.cancelled() and head.exception() is None:
            head.result().close()  # answered while being cancelled
        return None

    async def _whole(self, worker: str, response: aiohttp.ClientResponse) -> Response:
        """The worker's body of known length, read to the end and relayed as one response: one write to the client
        instead of a stream's three, and no stream task (a third of the router's time per JSON request)."""
        try:
            content = await response.read()
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            response.close()
            self.stats.count("truncated", worker)
            logger.warning("worker %s failed while answering: %s", worker, exc or type(exc).__name__)
            return error_response(502, f"worker {worker} failed while answering: {type(exc).__name__}")
        finally:
            self.workers.finished(worker)
        response.release()
        self.stats.count("response", worker)
        return Response(content, status_code=response.status, headers=_relayed(response))

    def _closer(self, worker: str, response: aiohttp.ClientResponse) -> Callable[[], None]:
        """Ends a relayed request once, however it ends: the worker's outstanding count, and its connection (back
        to the pool when the body was read to the end, else dropped: the worker sees the abort)."""
        closed = False

        def close() -> None:
            nonlocal closed
            if not closed:
                closed = True
                self.workers.finished(worker)
                if response.content.at_eof():
                    response.release()
                else:
                    response.close()

        return close

    async def _relay(self, worker: str, response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        """The worker's body as it arrives; an SSE stream failing midway ends with an error event."""
        sse = response.headers.get("content-type", "").startswith("text/event-stream")
        ended = True  # at an event boundary
        try:
            async for chunk in response.content.iter_any():
                ended = chunk.endswith(b"\n\n")
                yield chunk
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            self.stats.count("truncated", worker)
            logger.warning("worker %s failed while streaming: %s", worker, exc or type(exc).__name__)
            if not sse:
                raise
            event = json.dumps(error_body(f"worker {worker} failed while streaming: {type(exc).__name__}", 502))
            separator = b"" if ended else b"\n\n"  # after a partial event, end it first
            yield separator + f"data: {event}\n\ndata: [DONE]\n\n".encode()

    async def fan_out(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> dict[str, Any]:
        """Send the request to every worker (healthy or not); per worker its status and JSON answer (or text), or
        the error that kept it from answering."""
        async def one(url: str) -> tuple[str, dict[str, Any]]:
            try:
                async with self.session.request(method, url + path, data=body, headers=headers) as response:
                    content = await response.read()
                    try:
                        answer: Any = json.loads(content)
                    except ValueError:
                        answer = content.decode(errors="replace")
                    return url, {"status": response.status, "response": answer}
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                return url, {"status": None, "error": f"{type(exc).__name__}: {exc}"}

        return dict(await asyncio.gather(*(one(w.url) for w in self.workers.all())))


class _RelayResponse(StreamingResponse):
    """A streamed response that runs ``on_close`` however it ends: relayed to the end, failed, or abandoned by a
    client that left before its first chunk (when the body's generator never starts, so its own cleanup never
    runs)."""

    def __init__(self, content: AsyncIterator[bytes], status_code: int, headers: dict[str, str],
                 on_close: Callable[[], None]) -> None:
        super().__init__(content, status_code=status_code, headers=headers)
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _relayed(response: aiohttp.ClientResponse) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.lower() not in HOP_HEADERS}
