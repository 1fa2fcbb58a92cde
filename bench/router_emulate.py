"""The router simulation replayed over HTTP through real router processes (issue #21): ``radixlm router`` and
SGLang's ``sglang-router`` (0.3.2, Rust) on the same trace, in front of the same mock workers.

sglang-router's policies are not reachable from Python (its pyo3 module exposes only ``Router.start``, the whole
server), so both routers run as subprocesses and see real requests: ``/generate`` with the prompt's text (both
route ``/generate`` by its ``text``).  The workers are in-process aiohttp servers, each running bench/router_sim.py's
``SimWorker`` (the same continuous batching, prefix cache and cost model) on the asyncio clock, ``--time-scale``
real seconds per modeled second; a request's answer comes when its modeled last token does.  A worker answers
sglang-router's polls too: ``/health``, ``/server_info``, ``/model_info`` (200 with a small JSON object; the router
also tries gRPC first, an HTTP/2 preface the aiohttp server rejects, then falls back to HTTP).

The client (same process) replays the trace's sessions in scaled time, each turn a POST to the router, the next
turn ``think_s`` after the answer.  Reported, from the workers' model: cache hit rate, requests/s over the modeled
span, TTFT (modeled; it includes the HTTP hops' real time divided by the scale), and max/mean requests per worker.

    PYTHONPATH=. python bench/router_emulate.py                    # both traces, both routers, 2 policies
    PYTHONPATH=. python bench/router_emulate.py --traces shared --routers radixlm --policies cache_aware
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.append(str(Path(__file__).resolve().parent))  # bench/ is not a package: its siblings, shadowing nothing

from router_sim import CostModel, PrefixCacheModel, SimRequest, SimWorker, Summary, summarize  # noqa: E402
from router_traces import Session, chat_trace, shared_prompt_trace, tokens_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class AsyncioClock:
    """``router_sim.EventLoop``'s interface on the running asyncio loop: modeled seconds since construction,
    ``scale`` real seconds each."""

    def __init__(self, scale: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._t0 = self._loop.time()
        self.scale = scale

    @property
    def now(self) -> float:
        return (self._loop.time() - self._t0) / self.scale

    def at(self, t: float, fn: Callable[..., None], *args: object) -> asyncio.TimerHandle:
        return self._loop.call_at(self._t0 + t * self.scale, fn, *args)

    @staticmethod
    def cancel(handle: asyncio.TimerHandle) -> None:
        handle.cancel()

    async def sleep_until(self, t: float) -> None:
        await asyncio.sleep(max(0.0, t - self.now) * self.scale)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MockFleet:
    """``n`` mock workers on local ports, serving their polls at once and ``/generate`` from ``begin`` on.  The
    client registers each request by its text before sending it (``expect``); the worker that receives the text
    serves that request on its ``SimWorker``."""

    def __init__(self, n: int, cost: CostModel, cache_tokens: int, page: int, max_running: int,
                 prefill_budget: int) -> None:
        self.ports = [free_port() for _ in range(n)]
        self.urls = [f"http://127.0.0.1:{p}" for p in self.ports]
        self.sent = dict.fromkeys(self.urls, 0)
        self._make_worker = lambda url, clock: SimWorker(url, clock, cost, PrefixCacheModel(cache_tokens, page),
                                                         max_running, prefill_budget, self._finished)
        self.workers: dict[str, SimWorker] = {}
        self._pending: dict[str, SimRequest] = {}
        self._done: dict[SimRequest, asyncio.Future[None]] = {}
        self._runners: list[web.AppRunner] = []

    def begin(self, clock: AsyncioClock) -> None:
        """Fresh workers (empty caches) on ``clock``: modeled time 0 is the replay's start."""
        self.workers = {url: self._make_worker(url, clock) for url in self.urls}

    def expect(self, request: SimRequest) -> None:
        self._pending[request.text] = request

    def _finished(self, request: SimRequest) -> None:
        self._done.pop(request).set_result(None)

    async def start(self) -> None:
        for url, port in zip(self.urls, self.ports):
            app = web.Application(client_max_size=2**26)
            app.router.add_route("*", "/{tail:.*}", self._handler(url))
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            self._runners.append(runner)

    async def stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()

    def _handler(self, url: str) -> Callable[[web.Request], object]:
        async def handle(http: web.Request) -> web.Response:
            if http.path != "/generate":
                return web.json_response({"model_path": "mock", "is_generation": True})
            body = await http.json()
            request = self._pending.pop(body.get("text", ""), None)
            if request is None or url not in self.workers:
                return web.json_response({"error": "unknown request text"}, status=400)
            request.worker = url
            self.sent[url] += 1
            done = self._done[request] = asyncio.get_running_loop().create_future()
            self.workers[url].submit(request)
            await done
            return web.json_response({"text": "", "meta_info": {
                "prompt_tokens": len(request.prompt), "cached_tokens": request.cached,
                "completion_tokens": len(request.answer)}})
        return handle


async def replay(trace: list[Session], router_url: str, fleet: MockFleet, clock: AsyncioClock) -> list[SimRequest]:
    """Every session's turns through the router, closed loop per session; the finished requests."""
    finished: list[SimRequest] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=None)) as http:
        async def session_task(session: Session) -> None:
            await clock.sleep_until(session.start_s)
            for k, turn in enumerate(session.turns):
                if k:
                    await clock.sleep_until(clock.now + turn.think_s)
                prompt = session.prompt(k)
                request = SimRequest(session, k, prompt, tokens_text(prompt), clock.now)
                fleet.expect(request)
                body = {"text": request.text, "sampling_params": {"max_new_tokens": len(turn.answer)}}
                async with http.post(router_url + "/generate", json=body) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"router answered {response.status}: {await response.text()}")
                finished.append(request)

        await asyncio.gather(*(session_task(s) for s in trace))
    return finished


@contextlib.contextmanager
def router_process(kind: str, policy: str, urls: list[str], port: int, balance_abs_threshold: int
                   ) -> Iterator[str]:
    """A router subprocess in front of ``urls`` (its output kept, and shown if the body fails); yields its URL."""
    flags = ["--worker-urls", *urls, "--policy", policy, "--balance-abs-threshold", str(balance_abs_threshold)]
    if kind == "radixlm":
        cmd = [sys.executable, "-m", "radixlm.cli", "router", *flags, "--port", str(port), "--log-level", "warning"]
    else:
        cmd = [sys.executable, "-m", "sglang_router.launch_router", *flags, "--host", "127.0.0.1", "--port",
               str(port), "--prometheus-port", str(free_port()), "--log-level", "warn"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}"
    except BaseException:
        log.seek(0)
        sys.stderr.write(f"{kind} router's output:\n{log.read()[-4000:].decode(errors='replace')}\n")
        raise
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


async def wait_healthy(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.get(url + "/health", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"the router at {url} did not become healthy in {timeout_s} s")


async def run_one(kind: str, policy: str, trace: list[Session], ns: argparse.Namespace) -> tuple[Summary, float]:
    """The trace through one router; its summary and the real seconds the replay took."""
    fleet = MockFleet(ns.workers, CostModel(), ns.cache_tokens, ns.page, ns.max_running, ns.prefill_budget)
    await fleet.start()
    try:
        with router_process(kind, policy, fleet.urls, free_port(), ns.balance_abs_threshold) as url:
            await wait_healthy(url)
            await asyncio.sleep(1.0)  # sglang-router's worker discovery finishes after its first health pass
            start = time.perf_counter()
            clock = AsyncioClock(ns.time_scale)
            fleet.begin(clock)
            finished = await replay(trace, url, fleet, clock)
            return summarize(finished, fleet.sent), time.perf_counter() - start
    finally:
        await fleet.stop()


def make_trace(name: str, ns: argparse.Namespace) -> list[Session]:
    if name == "chat":
        return chat_trace(ns.chat_users, ns.chat_user_rate, ns.seed, turns=(3, 6), think_mean_s=1.0)
    return shared_prompt_trace(ns.shared_groups, ns.shared_requests, ns.shared_rate, ns.seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traces", nargs="+", choices=["chat", "shared"], default=["chat", "shared"])
    parser.add_argument("--routers", nargs="+", choices=["radixlm", "sglang"], default=["radixlm", "sglang"])
    parser.add_argument("--policies", nargs="+", default=["cache_aware", "round_robin"])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--cache-tokens", type=int, default=40_000, help="per worker")
    parser.add_argument("--page", type=int, default=16)
    parser.add_argument("--max-running", type=int, default=128)
    parser.add_argument("--prefill-budget", type=int, default=8192)
    parser.add_argument("--chat-users", type=int, default=64)
    parser.add_argument("--chat-user-rate", type=float, default=8.0, help="new conversations per modeled s")
    parser.add_argument("--shared-groups", type=int, default=32)
    parser.add_argument("--shared-requests", type=int, default=320)
    parser.add_argument("--shared-rate", type=float, default=40.0, help="requests per modeled s")
    parser.add_argument("--balance-abs-threshold", type=int, default=64, help="both routers' flag")
    parser.add_argument("--time-scale", type=float, default=2.0, help="real seconds per modeled second")
    parser.add_argument("--seed", type=int, default=1)
    ns = parser.parse_args()
    # sglang-router opens each worker with an HTTP/2 (gRPC) preface first: aiohttp logs the rejection per worker.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    print(f"{ns.workers} mock workers, {ns.cache_tokens:,} cached tokens each, time scale {ns.time_scale}, "
          f"--balance-abs-threshold {ns.balance_abs_threshold}")
    print("| trace | router | policy | requests | hit % | req/s | span s | TTFT mean s | TTFT p99 s | "
          "max/mean reqs | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for trace_name in ns.traces:
        trace = make_trace(trace_name, ns)
        for kind in ns.routers:
            for policy in ns.policies:
                s, wall = asyncio.run(run_one(kind, policy, trace, ns))
                print(f"| {trace_name} | {kind} | {policy} | {s.requests} | {100 * s.hit_rate:.1f} | "
                      f"{s.req_per_s:.1f} | {s.span_s:.1f} | {s.ttft_mean_s:.3f} | {s.ttft_p99_s:.3f} | "
                      f"{s.imbalance:.2f} | {wall:.0f} |", flush=True)


if __name__ == "__main__":
    main()
