"""The router process's HTTP application (issue #21): a Starlette app in front of the workers.

A request's way: the API key check (``Authorization: Bearer``, every route but ``/health``), the body read and
parsed as JSON (not JSON, or not an object: an OpenAI-style 400 from the router itself), its routing text
(``proxy.routing_text``), the policy's choice among the healthy workers given their outstanding requests, then
``Proxy.forward`` (retries, unbuffered relay).  The generating routes (``/generate``, ``/v1/chat/completions``,
``/v1/completions``) route by their text; every other worker route (``/v1/models``, ``/v1/embeddings``,
``/v1/tokenize``, ``/get_model_info``, ...) goes to the least loaded healthy worker.  The router's own routes:

- ``/health``: 200 when some worker is healthy, else 503;
- ``/flush_cache``, ``/abort_request``: sent to every worker, the answers per worker (200 when all answered 200);
- ``/add_worker?url=`` (POST; checked at once, and kept when unhealthy: it joins at its first passing check),
  ``/remove_worker?url=`` (POST), ``/list_workers``;
- ``/metrics``: Prometheus text: per worker the routing decisions, relayed responses, retried and truncated
  requests, outstanding requests and health.

A client that disconnects before the worker's response head cancels the worker's request (``Proxy.forward``'s
``client_gone``); one that leaves midway through the body drops the worker's connection (``_RelayResponse``).
Either way the worker sees its connection close, and radixlm workers abort the request there.

Background tasks (started with the app, cancelled at shutdown): a health check of every worker every
``health.interval_secs`` (and once before serving; ``workers.HealthChecks``), and the policy's eviction every
``eviction_interval_secs`` in slices of ``EVICTION_SLICE`` heap pops with the loop yielding between slices.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from radixlm.router.policy import RouterArgs, RoutingPolicy, make_policy
from radixlm.router.proxy import Proxy, ProxyStats, error_response, routing_text
from radixlm.router.workers import HealthChecks, WorkerSet, normalize_url
from radixlm.server.auth import ApiKeyMiddleware

logger = logging.getLogger(__name__)

EVICTION_SLICE = 128  # heap pops per slice: ~1 ms of the loop (docs/benchmarks.md, Router)
TEXT_ROUTES = ("/generate", "/v1/chat/completions", "/v1/completions")
FAN_OUT_ROUTES = ("/flush_cache", "/abort_request")
CONNECT_TIMEOUT_S = 10.0  # to open a worker connection; a generation itself has no time limit


class RouterMetrics:
    """The router's Prometheus series, in a registry of its own (one per app, no process-global state)."""

    def __init__(self, workers: WorkerSet, policy: str) -> None:
        self.registry = CollectorRegistry()
        self.workers = workers
        self.counters = {
            name: Counter(f"radixlm_router_{series}", doc, ["worker"], registry=self.registry)
            for name, series, doc in (
                ("decision", "decisions", f"tries sent to the worker: the {policy} policy's choices for the "
                                          "generating routes, the least loaded worker for the others"),
                ("response", "responses", "worker responses relayed to clients"),
                ("retried", "retries", "tries failed before the response head (connection error or 5xx): "
                                      "sent to another worker while one is left"),
                ("truncated", "truncated", "relayed responses the worker failed midway"))}
        self.outstanding = Gauge("radixlm_router_outstanding_requests", "requests forwarded, not yet ended",
                                 ["worker"], registry=self.registry)
        self.healthy = Gauge("radixlm_router_worker_healthy", "1 when the worker passed its last health check",
                             ["worker"], registry=self.registry)

    def count(self, name: str, worker: str) -> None:
        self.counters[name].labels(worker=worker).inc()

    def render(self) -> bytes:
        self.outstanding.clear()
        self.healthy.clear()
        for w in self.workers.all():
            self.outstanding.labels(worker=w.url).set(w.outstanding)
            self.healthy.labels(worker=w.url).set(int(w.healthy))
        return generate_latest(self.registry)


def create_router_app(args: RouterArgs, policy: RoutingPolicy | None = None, retries: int = 2,
                      health: HealthChecks = HealthChecks()) -> Any:
    """The router's ASGI app for ``args`` (``policy``: this one instead of ``make_policy(args)``; ``retries``:
    further workers tried after a failed try; ``health``: how workers are checked)."""
    policy = policy if policy is not None else make_policy(args)
    workers = WorkerSet(args.worker_urls, policy, health)
    metrics = RouterMetrics(workers, policy.name)
    state: dict[str, Proxy] = {}  # the proxy, built in the lifespan (its session belongs to the serving loop)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT_S),
                                        connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
        state["proxy"] = Proxy(workers, session, ProxyStats(metrics.count), retries, args.api_key)
        await workers.check_all(session)
        tasks = [asyncio.create_task(workers.health_loop(session)),
                 asyncio.create_task(_eviction_loop(policy, args.eviction_interval_secs))]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await session.close()

    async def routed(request: Request) -> Response:
        proxy = state["proxy"]
        body = await request.body()
        text = ""
        if request.url.path in TEXT_ROUTES:
            try:
                parsed = json.loads(body)
            except ValueError as exc:
                return error_response(400, f"the request body is not valid JSON: {exc}")
            if not isinstance(parsed, dict):
                return error_response(400, "the request body must be a JSON object")
            text = routing_text(request.url.path, parsed)
            route = policy.select
        else:
            route = _least_loaded
        path_qs = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return await proxy.forward(request.method, path_qs, body, proxy.request_headers(request.headers), text,
                                   route, lambda: _disconnected(request))

    async def fan_out(request: Request) -> Response:
        proxy = state["proxy"]
        answers = await proxy.fan_out(request.method, request.url.path, await request.body(),
                                      proxy.request_headers(request.headers))
        ok = bool(answers) and all(a["status"] == 200 for a in answers.values())
        return JSONResponse({"workers": answers}, status_code=200 if ok else 502)

    async def health(request: Request) -> Response:
        if workers.loads():
            return JSONResponse({})
        return error_response(503, "no healthy worker")

    async def add_worker(request: Request) -> Response:
        url = request.query_params.get("url")
        if not url:
            return error_response(400, "add_worker needs ?url=http://host:port", "url")
        url = normalize_url(url)
        if not workers.add(url):
            return error_response(400, f"worker {url} is already known", "url")
        healthy = await workers.check(state["proxy"].session, url)
        return JSONResponse({"url": url, "healthy": healthy})

    async def remove_worker(request: Request) -> Response:
        url = request.query_params.get("url")
        if not url:
            return error_response(400, "remove_worker needs ?url=http://host:port", "url")
        if not workers.remove(url):
            return error_response(404, f"worker {normalize_url(url)} is not known", "url")
        return JSONResponse({"url": normalize_url(url), "removed": True})

    async def list_workers(request: Request) -> Response:
        return JSONResponse({"policy": policy.name, "workers": [
            {"url": w.url, "healthy": w.healthy, "outstanding": w.outstanding} for w in workers.all()]})

    async def metrics_route(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    routes = [Route("/health", health, methods=["GET"]),
              Route("/add_worker", add_worker, methods=["POST"]),
              Route("/remove_worker", remove_worker, methods=["POST"]),
              Route("/list_workers", list_workers, methods=["GET"]),
              Route("/metrics", metrics_route, methods=["GET"]),
              *(Route(path, fan_out, methods=["GET", "POST"]) for path in FAN_OUT_ROUTES),
              Route("/{path:path}", routed, methods=["GET", "POST", "PUT", "DELETE", "PATCH"])]
    app: Any = Starlette(routes=routes, lifespan=lifespan)
    if args.api_key is not None:
        app = ApiKeyMiddleware(app, args.api_key)
    return app


async def _disconnected(request: Request) -> None:
    """Returns when the client has disconnected (its body already read: the next ASGI message is the
    disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _least_loaded(text: str, loads: dict[str, int]) -> str:
    return min(loads, key=loads.__getitem__)


async def _eviction_loop(policy: RoutingPolicy, interval_s: float) -> None:
    """Every ``interval_s``, ``policy.evict`` in bounded slices until done, yielding the loop between slices."""
    while True:
        await asyncio.sleep(interval_s)
        while not policy.evict(EVICTION_SLICE):
            await asyncio.sleep(0)
