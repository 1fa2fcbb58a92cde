"""Soak test: minutes of a realistic request mix against one server, then the invariants a long-running server owes.

    python bench/soak.py --duration 600               # spawns `radixlm serve` on the embedded model
    python bench/soak.py --url http://127.0.0.1:30000 --duration 60

Several concurrent clients (asyncio; the ``openai`` client for the OpenAI routes, a small raw HTTP client for the
native ones) each loop over a seeded random mix: chat and completions, streaming and not, native ``/generate``
(single and batched), n > 1 with a seed, JSON schemas through ``response_format``, regexes, logprobs with
top-logprobs, stop strings, clients that drop a stream after a few chunks or give up on a response, explicit
``/abort_request`` by rid, a grammar that matches nothing, and malformed requests that must get a 400.  ``--seed`` fixes the whole mix.

Afterwards (exit status 1 if any fails):
- no unexpected outcome: every request got what its kind expects (200, or a 400 for a bad request, an abort for
  an aborted one); an error, a 5xx or a timeout (a hang) is a failure;
- the engine is idle: no running, waiting or grammar-compiling request in the scheduler, no request the front end
  or the scheduler loop still tracks, every KV slot free or in the radix cache, and after ``/flush_cache`` free;
- process memory: the RSS of the HTTP server and of each scheduler process, measured after the warm-up and at the
  end, grew by at most ``--rss-bound-mib`` (see ``RSS bound`` below);
- correctness: a sample of the deterministic answers (greedy, or sampled with a seed) is replayed one at a time
  once the load has stopped; each must equal what it got under load, exactly (text, token ids, logprobs).

RSS bound: the warm-up runs the same mix, so that allocator caches, compiled grammars and lazily built objects
exist before the first reading (the KV pool is allocated and touched at startup).  Measured on the embedded model
(2-core CPU, float32): the HTTP server stays within +2 MiB; the scheduler climbs for the first several hundred
requests while its radix cache fills, then levels off (a repeated 48-request mixed batch without cache flushes:
2707, 2785, 2863, 2909, 2917, 2914 MiB over rounds as the cache went from 1.3k to 8.3k tokens; with a flush after
every round it stays at 2800 +- 20 MiB from the third round on).  The default bound, +128 MiB per process after
a 60 s warm-up, leaves room for the end of that climb and still catches the leaks that matter over a 10-minute
run (about 1,500+ generations): one vocabulary-sized float32 row (49152 x 4 bytes = 192 KiB) kept per request is
~280 MiB.  The RSS is sampled every few seconds (progress lines, the table's peak): a steady climb shows there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from soak_mix import KINDS, REQUEST_TIMEOUT_S, Clients, HttpError, Outcome, RawHttp, Replay

IDLE_TIMEOUT_S = 60.0  # for the engine to drain once the clients stop
RSS_SAMPLE_INTERVAL_S = 5.0
PROGRESS_INTERVAL_S = 30.0
MAX_EXAMPLES = 5  # unexpected outcomes printed per kind

# ---------------------------------------------------------------------------------------------------- the server
class Server:
    """A spawned ``radixlm serve`` (stopped at the end), or one given by ``--url``."""

    def __init__(self, args: argparse.Namespace):
        self.proc: subprocess.Popen | None = None
        if args.url:
            self.base = args.url.rstrip("/")
            return
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "radixlm.serve", "--port", str(port), "--random-seed", str(args.seed),
               "--dtype", "float32", "--log-level", "warning", *args.server_args.split()]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        self.log = open(args.server_log, "w") if args.server_log else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    async def wait_healthy(self, http: RawHttp, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}")
            try:
                if (await http.request("GET", "/health"))[0] == 200:
                    return
            except OSError:
                pass
            await asyncio.sleep(0.5)
        raise RuntimeError("the server did not become healthy in time")

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("PPid:"))
    except (OSError, StopIteration):
        return None


# ---------------------------------------------------------------------------------------------------- the run
@dataclass
class Stats:
    outcomes: Counter = field(default_factory=Counter)  # (kind, result) -> count
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    replays: list[Replay] = field(default_factory=list)
    deterministic_seen: int = 0

    def add(self, outcome: Outcome, rng: random.Random, keep: int) -> None:
        result = outcome.result
        if result.startswith("FAIL"):
            if len(self.examples[outcome.kind]) < MAX_EXAMPLES:
                self.examples[outcome.kind].append(result)
            result = "FAIL"
        self.outcomes[(outcome.kind, result)] += 1
        if outcome.replay is not None:  # reservoir sample of the deterministic answers
            self.deterministic_seen += 1
            if len(self.replays) < keep:
                self.replays.append(outcome.replay)
            elif (j := rng.randrange(self.deterministic_seen)) < keep:
                self.replays[j] = outcome.replay

    @property
    def failures(self) -> int:
        return sum(v for (_, r), v in self.outcomes.items() if r == "FAIL")


async def client_loop(c: Clients, worker: int, seed: int, until: float, stats: Stats, sample_rng: random.Random,
                      keep: int) -> None:
    rng = random.Random(seed * 1000 + worker)
    names = list(KINDS)
    weights = [KINDS[k][0] for k in names]
    while time.monotonic() < until:
        kind = rng.choices(names, weights)[0]
        try:
            outcome = await asyncio.wait_for(KINDS[kind][1](c, rng), REQUEST_TIMEOUT_S)
        except asyncio.TimeoutError:
            outcome = Outcome(kind, f"FAIL: no answer within {REQUEST_TIMEOUT_S:.0f} s (a hang)")
        except Exception as e:  # an HTTP error status or a broken connection where none was expected
            outcome = Outcome(kind, f"FAIL: {type(e).__name__}: {str(e)[:300]}")
        stats.add(outcome, sample_rng, keep)


async def print_progress(stats: Stats, start: float, pids: dict[str, int]) -> None:
    while True:
        await asyncio.sleep(PROGRESS_INTERVAL_S)
        rss = ", ".join(f"{name.split(' (')[0]} {rss_mib(pid) or 0:.0f}" for name, pid in pids.items())
        print(f"  {time.monotonic() - start:5.0f} s: {sum(stats.outcomes.values())} requests, "
              f"{stats.failures} failures; RSS MiB: {rss}", flush=True)


async def server_state(http: RawHttp) -> dict[str, Any]:
    status, info = await http.request("GET", "/get_server_info")
    if status != 200:
        raise HttpError(status, json.dumps(info))
    return info


async def wait_idle(http: RawHttp) -> dict[str, Any]:
    """The scheduler's state once nothing runs (or the last seen state after ``IDLE_TIMEOUT_S``)."""
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while True:
        info = await server_state(http)
        state = info["internal_states"][0]
        busy = (state["num_running_reqs"], state["num_waiting_reqs"], state["num_grammar_queue_reqs"],
                state.get("num_tracked_reqs", 0), info.get("num_frontend_reqs", 0))
        if not any(busy) or time.monotonic() > deadline:
            return info
        await asyncio.sleep(0.5)


def process_pids(info: dict[str, Any], server: Server) -> dict[str, int]:
    pids = {f"scheduler {i} ({pid})": pid for i, pid in enumerate(info.get("scheduler_pids", []))}
    http_pid = server.proc.pid if server.proc is not None else parent_pid(next(iter(pids.values()), 0) or 0)
    return {f"http server ({http_pid})": http_pid, **pids} if http_pid else pids


async def run(args: argparse.Namespace) -> int:
    server = Server(args)
    checks: list[tuple[str, bool, str]] = []  # (invariant, held, detail)
    try:
        c = Clients(server.base, args.api_key)
        await server.wait_healthy(c.http)
        stats, sample_rng = Stats(), random.Random(args.seed)
        print(f"soak: {server.base}, {args.clients} clients, warm-up {args.warmup:.0f} s, run {args.duration:.0f} s, "
              f"seed {args.seed}", flush=True)

        start = time.monotonic()
        await asyncio.gather(*(client_loop(c, w, args.seed, start + args.warmup, stats, sample_rng, args.replay)
                               for w in range(args.clients)))
        pids = process_pids(await wait_idle(c.http), server)
        rss_start = {name: rss_mib(pid) for name, pid in pids.items()}
        rss_peak = dict(rss_start)

        async def sample_rss() -> None:
            while True:
                await asyncio.sleep(RSS_SAMPLE_INTERVAL_S)
                for name, pid in pids.items():
                    now = rss_mib(pid)
                    if now is not None and rss_peak[name] is not None:
                        rss_peak[name] = max(rss_peak[name], now)

        sampler = asyncio.create_task(sample_rss())
        progress = asyncio.create_task(print_progress(stats, time.monotonic(), pids))
        run_start = time.monotonic()
        await asyncio.gather(*(client_loop(c, w, args.seed + 1, run_start + args.duration, stats, sample_rng,
                                           args.replay) for w in range(args.clients)))
        elapsed = time.monotonic() - start
        sampler.cancel()
        progress.cancel()

        # ---- the engine is idle, its KV free
        info = await wait_idle(c.http)
        state = info["internal_states"][0]
        rss_end = {name: rss_mib(pid) for name, pid in pids.items()}
        leftover = {k: state[k] for k in ("num_running_reqs", "num_waiting_reqs", "num_grammar_queue_reqs",
                                          "num_tracked_reqs") if k in state}
        if "num_frontend_reqs" in info:
            leftover["num_frontend_reqs"] = info["num_frontend_reqs"]
        checks.append(("no request left in the engine", not any(leftover.values()), str(leftover)))
        total, available = state["max_total_num_tokens"], state["available_kv_tokens"]
        cached = state["cached_kv_tokens"]
        checks.append(("KV: available + cached == total", available + cached == total,
                       f"{available} + {cached} of {total}"))
        status, reply = await c.http.request("POST", "/flush_cache")
        after_flush = (await server_state(c.http))["internal_states"][0]["available_kv_tokens"]
        checks.append(("KV after /flush_cache: available == total", status == 200 and after_flush == total,
                       f"{after_flush} of {total} (flush: {status})"))

        # ---- memory
        rss_rows = []
        for name in pids:
            s, e, p = rss_start[name], rss_end[name], rss_peak[name]
            if s is None or e is None:
                rss_rows.append((name, "n/a", "n/a", "n/a", "not measured (no /proc access)"))
                continue
            bound = args.rss_bound_mib
            grown = e - s
            rss_rows.append((name, f"{s:.0f}", f"{e:.0f}", f"{max(p, e):.0f}", f"{grown:+.1f} (bound +{bound:.0f})"))
            checks.append((f"RSS {name}", grown <= bound, f"{s:.0f} -> {e:.0f} MiB ({grown:+.1f}, bound +{bound:.0f})"))

        # ---- correctness: each sampled deterministic answer again, alone
        mismatches = []
        for replay in stats.replays:
            try:
                alone = await asyncio.wait_for(replay.run(), REQUEST_TIMEOUT_S)
            except Exception as e:
                alone = f"replay failed: {type(e).__name__}: {e}"
            if _canonical(alone) != _canonical(replay.answer):
                mismatches.append((replay.kind, replay.answer, alone))
        checks.append(("sampled answers equal their answers alone", not mismatches,
                       f"{len(stats.replays) - len(mismatches)}/{len(stats.replays)} equal "
                       f"(of {stats.deterministic_seen} deterministic)"))
        for kind, under_load, alone in mismatches[:MAX_EXAMPLES]:
            print(f"MISMATCH {kind}:\n  under load: {under_load!r}\n  alone:      {alone!r}")
        healthy = (await c.http.request("GET", "/health"))[0] == 200
        checks.append(("server healthy afterwards", healthy, ""))
        checks.append(("no unexpected outcome", stats.failures == 0, f"{stats.failures} failures"))
        report(stats, elapsed, args, rss_rows, checks)
    finally:
        code = server.stop()
        if code not in (None, 0):
            checks.append(("server exited cleanly", False, f"exit code {code}"))
            print(f"FAIL server exited cleanly: exit code {code}")
    return 0 if checks and all(held for _, held, _ in checks) else 1


def _canonical(answer: Any) -> str:
    return json.dumps(answer, sort_keys=True, default=repr)


def report(stats: Stats, elapsed: float, args: argparse.Namespace, rss_rows: list[tuple], checks: list[tuple]) -> None:
    kinds = sorted({k for k, _ in stats.outcomes})
    results = sorted({r for _, r in stats.outcomes}, key=lambda r: (r == "FAIL", r != "ok", r))
    total = sum(stats.outcomes.values())
    print(f"\n## soak: {total} requests in {elapsed:.0f} s ({args.warmup:.0f} s warm-up + {args.duration:.0f} s), "
          f"{args.clients} clients, seed {args.seed}\n")
    print("| kind | " + " | ".join(results) + " | total |")
    print("|---" * (len(results) + 2) + "|")
    for kind in kinds:
        row = [stats.outcomes.get((kind, r), 0) for r in results]
        print(f"| {kind} | " + " | ".join(str(v) for v in row) + f" | {sum(row)} |")
    sums = [sum(stats.outcomes.get((k, r), 0) for k in kinds) for r in results]
    print("| **all** | " + " | ".join(str(v) for v in sums) + f" | {total} |")
    print("\n| process | RSS start (MiB) | RSS end (MiB) | RSS peak (MiB) | growth (MiB) |\n|---|---|---|---|---|")
    for row in rss_rows:
        print("| " + " | ".join(row) + " |")
    print("\n| invariant | held | detail |\n|---|---|---|")
    for name, held, detail in checks:
        print(f"| {name} | {'yes' if held else '**NO**'} | {detail} |")
    for kind, examples in stats.examples.items():
        for example in examples:
            print(f"{kind}: {example}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", help="a running server (default: spawn `radixlm serve` on the embedded model)")
    p.add_argument("--api-key", default=os.environ.get("RADIXLM_API_KEY"))
    p.add_argument("--duration", type=float, default=600, help="seconds of load after the warm-up")
    p.add_argument("--warmup", type=float, default=60, help="seconds of the same mix before the first RSS reading")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients")
    p.add_argument("--seed", type=int, default=0, help="fixes the request mix (and the spawned server's seed)")
    p.add_argument("--replay", type=int, default=100, help="deterministic answers replayed alone afterwards")
    p.add_argument("--rss-bound-mib", type=float, default=128, help="allowed RSS growth per process after the warm-up")
    p.add_argument("--server-args", default="", help="extra flags for the spawned server")
    p.add_argument("--server-log", help="file for the spawned server's output (default: discarded)")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through run(), which stops the server
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
