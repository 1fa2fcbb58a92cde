"""Router overhead under load (issue #21): one router process in front of mock workers that answer at once, ours
(``radixlm router``) against SGLang's Rust router (``python -m sglang_router.launch_router``), side by side with
the mocks served directly.

Every process is separate: the mock workers (an asyncio HTTP/1.1 server each, answering a ~300-byte JSON
completion or an SSE stream of --chunks events with no work, so the numbers are the router's and the client's),
the router, and --clients load generator processes (aiohttp, one pooled session each).  Per target (``direct``:
the client spreads requests over the mocks itself; ``ours``; ``sglang``) and mode (``/v1/completions`` JSON, or
``stream: true`` SSE read to its end):

- closed loop: --concurrency requests in flight for --duration seconds; requests/s is the most the target
  sustains (with the generator's and the mocks' cost: compare against ``direct``);
- open loop: requests arrive at each of --rates per second (Poisson, or --fixed-interval) for --duration seconds,
  whatever the answers do, so a slow router shows as latency, not as a lower offered rate.  Latency runs from a
  request's scheduled arrival to its last byte; ``added`` is the target's minus ``direct``'s at the same rate.
  ``achieved`` is the completed requests per second; below the offered rate, the generator or the target fell
  behind and the latencies are queueing.
- router CPU: the router process's CPU time (user + system, all its threads, from /proc) per completed request
  during the row: what one request costs the router, which holds on a machine shared with other jobs where the
  latencies and requests/s do not.

Prompts: 16 shared 1 KB "system prompts", each request one of them plus a unique question (cache_aware's tree
grows as in real use).  --cpus pins the parts (``os.sched_setaffinity``): ``router:0-3,workers:4-7,load:8-15``.

    python bench/router_load.py --duration 5 --rates 1000,5000 --routers ours,sglang --workers 4 \\
        --clients 4 --cpus router:0-1,workers:2-7,load:8-15
    python bench/router_load.py --duration 2 --rates 200 --clients 1     # a quick check on a small machine
    python bench/router_load.py --routers ours --profile-router /tmp/prof  # cProfile of our router under load
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import multiprocessing
import os
import pstats
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SYSTEM_PROMPTS = 16
PROMPT_WORDS = ("weather", "river", "engine", "market", "garden", "signal", "harbor", "lantern")


# ---------------------------------------------------------------- the mock worker


def mock_answers(chunks: int) -> tuple[bytes, bytes, bytes]:
    """The mock's raw responses: (a JSON completion, an SSE stream of ``chunks`` events, a GET's ``{}``)."""
    completion = json.dumps({"id": "x", "object": "text_completion", "model": "m",
                             "choices": [{"index": 0, "text": "word " * 40, "finish_reason": "length"}],
                             "usage": {"prompt_tokens": 300, "completion_tokens": 40, "total_tokens": 340}}).encode()
    json_answer = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                   + str(len(completion)).encode() + b"\r\n\r\n" + completion)
    event = b'data: {"id":"x","object":"text_completion","choices":[{"index":0,"text":" word"}]}\n\n'
    body = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in [event] * chunks + [b"data: [DONE]\n\n"]) + b"0\r\n\r\n"
    sse_answer = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n" + body
    empty = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
    return json_answer, sse_answer, empty


class MockProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive, bodies with Content-Length: a POST whose body asks for ``"stream": true`` gets the
    SSE answer, any other POST the JSON one, any GET (``/health``, the routers' polls) ``{}``.  Hand-written so
    that the mock is not the bottleneck (a uvicorn mock sustains a few thousand requests/s per process)."""

    def __init__(self, answers: tuple[bytes, bytes, bytes], paths: set[str]) -> None:
        self.answers = answers
        self.paths = paths  # the GET paths seen (what routers poll), for --verbose
        self.buffer = b""
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1").split("\r\n")
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
                elif name.strip().lower() == "transfer-encoding":
                    raise ValueError("the mock takes Content-Length bodies only")
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4:end + 4 + length]
            self.buffer = self.buffer[end + 4 + length:]
            request_line = head[0].split(" ")
            if len(request_line) != 3 or request_line[2] != "HTTP/1.1":
                # SGLang's router probes a worker for gRPC (an HTTP/2 preface) before HTTP: not this mock's
                self.transport.close()
                return
            method, path = request_line[:2]
            if method == "GET":
                self.paths.add(path)
                self.transport.write(self.answers[2])
            else:
                stream = b'"stream": true' in body or b'"stream":true' in body
                self.transport.write(self.answers[1] if stream else self.answers[0])


def serve_mock(port: int, chunks: int, cpus: set[int] | None, verbose: bool) -> None:
    pin(cpus)
    paths: set[str] = set()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: MockProtocol(mock_answers(chunks), paths), "127.0.0.1", port,
                                          backlog=4096)
        async with server:
            while True:
                await asyncio.sleep(5)
                if verbose:
                    print(f"mock :{port} GET paths seen: {sorted(paths)}", flush=True)

    asyncio.run(main())


# ---------------------------------------------------------------- the load generator


@dataclass
class Load:
    urls: list[str]  # the targets, one request each in turn
    stream: bool
    duration: float
    seed: int
    rate: float = 0.0  # open loop: requests/s of this generator process
    fixed_interval: bool = False
    concurrency: int = 0  # closed loop: requests in flight
    start_at: float = 0.0  # time.time() at which all generators start


@dataclass
class Outcome:
    latencies: list[float] = field(default_factory=list)  # seconds, of the requests that succeeded
    errors: int = 0
    first_error: str = ""
    elapsed: float = 0.0  # from the start to the last answer


def bodies(seed: int, n: int, stream: bool) -> list[bytes]:
    rng = random.Random(seed)
    systems = [" ".join(rng.choice(PROMPT_WORDS) for _ in range(150)) for _ in range(SYSTEM_PROMPTS)]
    return [json.dumps({"model": "m", "prompt": f"{systems[i % SYSTEM_PROMPTS]}\nQuestion {seed}-{i}: "
                        + " ".join(rng.choice(PROMPT_WORDS) for _ in range(8)), "max_tokens": 16,
                        "stream": stream}).encode() for i in range(n)]


def run_load(load: Load, cpus: set[int] | None) -> Outcome:
    pin(cpus)
    return asyncio.run(_run_load(load))


async def _run_load(load: Load) -> Outcome:
    import aiohttp

    outcome = Outcome()
    n = int(load.rate * load.duration) if load.rate else 200_000
    payloads = bodies(load.seed, min(n, 50_000), load.stream)
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30), auto_decompress=False,
                                    connector=aiohttp.TCPConnector(limit=0, force_close=False))
    headers = {"content-type": "application/json"}
    count = 0

    async def one(scheduled: float) -> None:
        nonlocal count
        i = count
        count += 1
        try:
            async with session.post(load.urls[i % len(load.urls)] + "/v1/completions",
                                    data=payloads[i % len(payloads)], headers=headers) as response:
                if load.stream:
                    async for _ in response.content.iter_any():
                        pass
                else:
                    await response.read()
                if response.status != 200:
                    raise RuntimeError(f"status {response.status}")
            outcome.latencies.append(time.perf_counter() - scheduled)
        except Exception as exc:  # counted and reported: a failing target is a result
            outcome.errors += 1
            outcome.first_error = outcome.first_error or f"{type(exc).__name__}: {exc}"

    try:
        for _ in range(min(50, n)):  # open a few connections before the clock starts
            await one(time.perf_counter())
        outcome = Outcome()
        await asyncio.sleep(max(0.0, load.start_at - time.time()))
        start = time.perf_counter()
        if load.concurrency:
            end = start + load.duration

            async def loop() -> None:
                while time.perf_counter() < end:
                    await one(time.perf_counter())

            await asyncio.gather(*(loop() for _ in range(load.concurrency)))
        else:
            rng = random.Random(load.seed)
            tasks = []
            scheduled = start
            for _ in range(n):
                scheduled += 1.0 / load.rate if load.fixed_interval else rng.expovariate(load.rate)
                delay = scheduled - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.ensure_future(one(scheduled)))
            await asyncio.gather(*tasks)
        outcome.elapsed = time.perf_counter() - start
    finally:
        await session.close()
    return outcome


def generate(urls: list[str], clients: int, cpus: set[int] | None, **kw: Any) -> Outcome:
    """``clients`` generator processes together (``rate`` and ``concurrency`` split among them)."""
    start_at = time.time() + 1.5  # after every process has started and warmed up
    loads = [Load(urls=urls, seed=1000 * c + 1, start_at=start_at,
                  **{k: (v / clients if k == "rate" else max(1, v // clients) if k == "concurrency" else v)
                     for k, v in kw.items()}) for c in range(clients)]
    with multiprocessing.get_context("spawn").Pool(clients) as pool:
        parts = pool.starmap(run_load, [(load, cpus) for load in loads])
    total = Outcome()
    for part in parts:
        total.latencies += part.latencies
        total.errors += part.errors
        total.first_error = total.first_error or part.first_error
        total.elapsed = max(total.elapsed, part.elapsed)
    return total


def measured(proc: subprocess.Popen | None, urls: list[str], clients: int, cpus: set[int] | None,
             **kw: Any) -> tuple[float | None, Outcome]:
    """``generate``'s outcome, and the CPU seconds the router process ``proc`` spent meanwhile (None without
    one).  The generators' warm-up requests fall in the window too: they are few (50 a process)."""
    before = cpu_seconds(proc.pid) if proc is not None else 0.0
    outcome = generate(urls, clients, cpus, **kw)
    return (cpu_seconds(proc.pid) - before if proc is not None else None), outcome


# ---------------------------------------------------------------- the routers


def pin(cpus: set[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)


def parse_cpus(spec: str | None) -> dict[str, set[int] | None]:
    """``router:0-1,workers:2-7,load:8-15`` -> {"router": {0, 1}, ...} (a part not named: not pinned)."""
    parts: dict[str, set[int] | None] = {"router": None, "workers": None, "load": None}
    for item in (spec or "").split(","):
        if not item:
            continue
        name, _, ranges = item.partition(":")
        if name not in parts:
            raise ValueError(f"--cpus: unknown part {name!r} (router, workers, load)")
        cpus: set[int] = set()
        for r in ranges.split("+"):
            low, _, high = r.partition("-")
            cpus.update(range(int(low), int(high or low) + 1))
        parts[name] = cpus
    return parts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen | None, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not become healthy")


def router_command(name: str, workers: list[str], port: int, profile: str | None) -> list[str]:
    if name == "ours":
        run = ["-m", "cProfile", "-o", profile, "-m", "radixlm.cli"] if profile else ["-m", "radixlm.cli"]
        return [sys.executable, *run, "router", "--worker-urls", *workers, "--policy", "cache_aware",
                "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    return [sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *workers, "--policy",
            "cache_aware", "--host", "127.0.0.1", "--port", str(port), "--prometheus-port", str(free_port()),
            "--log-level", "warn"]


def start_router(name: str, workers: list[str], cpus: set[int] | None,
                 profile: str | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(router_command(name, workers, port, profile), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, preexec_fn=(lambda: pin(cpus)) if cpus else None)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
    except BaseException:
        proc.kill()
        raise
    return proc, url


def stop(proc: subprocess.Popen) -> None:
    # SIGINT: uvicorn shuts down and re-raises it as a KeyboardInterrupt, on which a cProfile wrapper still writes
    # its file (a re-raised SIGTERM would kill the process first)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------- the table


def quantile_ms(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] * 1e3 if len(values) > 1 else float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` and all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def row(target: str, mode: str, test: str, offered: str, outcome: Outcome, base: Outcome | None,
        cpu_s: float | None) -> str:
    done = len(outcome.latencies)
    achieved = done / outcome.elapsed if outcome.elapsed else 0.0
    p50, p99 = quantile_ms(outcome.latencies, 50), quantile_ms(outcome.latencies, 99)
    added = "| - | - "
    if base is not None and target != "direct":
        added = (f"| {p50 - quantile_ms(base.latencies, 50):+.2f} "
                 f"| {p99 - quantile_ms(base.latencies, 99):+.2f} ")
    errors = f"{outcome.errors}" + (f" ({outcome.first_error[:60]})" if outcome.errors else "")
    cpu = f"{cpu_s / done * 1e6:,.0f}" if cpu_s is not None and done else "-"
    return (f"| {target} | {mode} | {test} | {offered} | {achieved:,.0f} | {p50:.2f} | {p99:.2f} {added}"
            f"| {cpu} | {errors} |")


def print_profile(path: str, top: int = 25) -> None:
    print(f"\ncProfile of our router (tottime, top {top}); the file: {path}")
    pstats.Stats(path).strip_dirs().sort_stats("tottime").print_stats(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of each measurement")
    parser.add_argument("--rates", default="1000,5000", help="offered requests/s of the open-loop runs")
    parser.add_argument("--routers", default="ours,sglang")
    parser.add_argument("--modes", default="json,sse")
    parser.add_argument("--workers", type=int, default=2, help="mock worker processes")
    parser.add_argument("--clients", type=int, default=2, help="load generator processes")
    parser.add_argument("--concurrency", type=int, default=128, help="in flight in the closed-loop runs")
    parser.add_argument("--chunks", type=int, default=16, help="events of an SSE answer")
    parser.add_argument("--fixed-interval", action="store_true", help="open loop: fixed gaps instead of Poisson")
    parser.add_argument("--cpus", default=None, help="router:A-B,workers:C-D,load:E-F (ranges joined by +)")
    parser.add_argument("--profile-router", default=None, metavar="FILE",
                        help="run our router under cProfile, write FILE and print its top functions")
    parser.add_argument("--verbose", action="store_true", help="the mocks print the GET paths routers poll")
    args = parser.parse_args()
    cpus = parse_cpus(args.cpus)
    rates = [float(r) for r in args.rates.split(",") if r]
    modes = [m for m in args.modes.split(",") if m]
    routers = [r for r in args.routers.split(",") if r]
    if "sglang" in routers and importlib.util.find_spec("sglang_router") is None:
        print("sglang_router is not importable (pip install sglang-router): skipping the sglang router")
        routers.remove("sglang")

    ports = [free_port() for _ in range(args.workers)]
    mocks = [multiprocessing.get_context("spawn").Process(
        target=serve_mock, args=(port, args.chunks, cpus["workers"], args.verbose), daemon=True) for port in ports]
    for mock in mocks:
        mock.start()
    workers = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        for url in workers:
            wait_healthy(url, None)
        print(f"{args.workers} mock workers, {args.clients} load generator processes, {args.duration:g} s per "
              f"row, closed loop {args.concurrency} in flight, open loop "
              f"{'fixed-interval' if args.fixed_interval else 'Poisson'} arrivals, SSE {args.chunks} events; "
              f"cpus {args.cpus or 'not pinned'} ({os.cpu_count()} on the host)", flush=True)
        print("| target | mode | test | offered req/s | achieved req/s | p50 ms | p99 ms | added p50 ms | "
              "added p99 ms | router CPU us/req | errors |")
        print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
        base: dict[tuple[str, str], Outcome] = {}
        for target in ["direct", *routers]:
            proc, urls = None, workers
            if target != "direct":
                profile = args.profile_router if target == "ours" else None
                proc, url = start_router(target, workers, cpus["router"], profile)
                urls = [url]
            try:
                for mode in modes:
                    stream = mode == "sse"
                    cpu_s, outcome = measured(proc, urls, args.clients, cpus["load"], stream=stream,
                                              duration=args.duration, concurrency=args.concurrency)
                    print(row(target, mode, "closed", f"{args.concurrency} in flight", outcome, None, cpu_s),
                          flush=True)
                    for rate in rates:
                        cpu_s, outcome = measured(proc, urls, args.clients, cpus["load"], stream=stream,
                                                  duration=args.duration, rate=rate,
                                                  fixed_interval=args.fixed_interval)
                        if target == "direct":
                            base[mode, str(rate)] = outcome
                        print(row(target, mode, "open", f"{rate:,.0f}", outcome, base.get((mode, str(rate))),
                                  cpu_s), flush=True)
            finally:
                if proc is not None:
                    stop(proc)
        if args.profile_router and "ours" in routers:
            print_profile(args.profile_router)
    finally:
        for mock in mocks:
            mock.terminate()
            mock.join()


if __name__ == "__main__":
    main()
