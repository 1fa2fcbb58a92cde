"""The router's HTTP client, measured (issue #21): httpx vs aiohttp, each one pooled client forwarding requests to
a local mock worker (uvicorn in its own process, answering at once), as the router's proxy does.

Per client and mode (a JSON completion, or an SSE stream of --chunks events read chunk by chunk):
requests/s with --concurrency requests in flight, and the latency of one request at a time (p50/p99): the time
the hop through the client adds to a request, since the mock does no work.

    python bench/router_overhead.py                       # 2000 requests per cell
    python bench/router_overhead.py --requests 500 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import socket
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

BODY = json.dumps({"model": "m", "prompt": "hello " * 50, "max_tokens": 16}).encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_mock(port: int, chunks: int) -> None:
    """A worker that answers at once: a ~300-byte JSON completion, or ``chunks`` SSE events then ``[DONE]``."""
    import uvicorn

    answer = json.dumps({"id": "x", "object": "text_completion",
                         "choices": [{"index": 0, "text": "word " * 40, "finish_reason": "length"}]}).encode()
    event = b'data: {"choices":[{"index":0,"text":" word"}]}\n\n'

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        if scope["path"] == "/stream":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            for _ in range(chunks):
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": answer})

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="error", access_log=False)


def wait_up(port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("the mock worker did not start")


def httpx_client(base: str, concurrency: int) -> tuple[Callable[[str, bool], Awaitable[None]], Callable[[], Any]]:
    import httpx

    client = httpx.AsyncClient(base_url=base, timeout=None,
                               limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency))

    async def one(path: str, stream: bool) -> None:
        async with client.stream("POST", path, content=BODY, headers={"content-type": "application/json"}) as r:
            if stream:
                async for _ in r.aiter_raw():
                    pass
            else:
                await r.aread()

    return one, client.aclose


def aiohttp_client(base: str, concurrency: int) -> tuple[Callable[[str, bool], Awaitable[None]], Callable[[], Any]]:
    import aiohttp

    session = aiohttp.ClientSession(base_url=base, timeout=aiohttp.ClientTimeout(total=None),
                                    connector=aiohttp.TCPConnector(limit=concurrency), auto_decompress=False)

    async def one(path: str, stream: bool) -> None:
        async with session.post(path, data=BODY, headers={"content-type": "application/json"}) as r:
            if stream:
                async for _ in r.content.iter_any():
                    pass
            else:
                await r.read()

    return one, session.close


async def measure(make: Any, base: str, stream: bool, requests: int, concurrency: int) -> dict[str, float]:
    one, close = make(base, concurrency)
    path = "/stream" if stream else "/json"
    try:
        for _ in range(50):  # warm the pool
            await one(path, stream)
        latencies = []
        for _ in range(requests // 4):
            t = time.perf_counter()
            await one(path, stream)
            latencies.append(time.perf_counter() - t)
        left = requests

        async def loop() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await one(path, stream)

        t = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        rps = requests / (time.perf_counter() - t)
    finally:
        await close()
    q = statistics.quantiles(latencies, n=100)
    return {"rps": rps, "p50": q[49] * 1e3, "p99": q[98] * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--chunks", type=int, default=32)
    args = parser.parse_args()
    port = free_port()
    worker = multiprocessing.get_context("spawn").Process(target=serve_mock, args=(port, args.chunks), daemon=True)
    worker.start()
    try:
        wait_up(port)
        base = f"http://127.0.0.1:{port}"
        print(f"{args.requests} requests per cell, {args.concurrency} in flight for requests/s, one at a time for "
              f"latency; streams of {args.chunks} events")
        print("| client | mode | requests/s | p50 ms | p99 ms |")
        print("|---|---|---|---|---|")
        for name, make in (("httpx", httpx_client), ("aiohttp", aiohttp_client)):
            for stream in (False, True):
                r = asyncio.run(measure(make, base, stream, args.requests, args.concurrency))
                print(f"| {name} | {'SSE' if stream else 'JSON'} | {r['rps']:,.0f} | {r['p50']:.2f} | "
                      f"{r['p99']:.2f} |", flush=True)
    finally:
        worker.terminate()
        worker.join()


if __name__ == "__main__":
    main()
