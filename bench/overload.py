"""Overload: throughput and latency at a multiple of the sustainable request rate, with and without
``--max-queued-requests``, on a server this script starts (the embedded model unless told otherwise).

    python bench/overload.py --duration 30 --overload 2 --max-queued-requests 8

1. Sustainable rate: a server without a queue limit gets ``--saturate`` requests at once; completed requests per
   second is the rate it sustains (``--rate`` skips this and takes the given one).
2. For each configuration (no limit, then ``--max-queued-requests N``) a fresh server gets Poisson arrivals at
   ``--overload`` times that rate for ``--duration`` seconds, without a concurrency cap (clients that do not back
   off, the case a queue limit is for).  Every request is greedy with ``ignore_eos`` (exactly ``--output-len``
   tokens) over a random ``--input-len``-token prompt.
3. One table row per configuration: offered and served rates, requests refused (503), goodput (tokens of served
   requests per second of the run, the tail included), and the latency percentiles of served requests.  Without a
   limit the queue grows for the whole run and so do the latencies; with one, the excess is refused at once and
   the served requests keep their latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request

from serving import Result, one_request, percentiles


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, flags: list[str]):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "radixlm.serve", "--port", str(self.port), "--log-level", "warning", *flags]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}: {' '.join(cmd)}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError("the server did not become healthy")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def prompts(args: argparse.Namespace, count: int) -> list[list[int]]:
    rng = random.Random(args.seed)
    return [[rng.randrange(100, 10000) for _ in range(args.input_len)] for _ in range(count)]


def client_args(base: str) -> argparse.Namespace:
    return argparse.Namespace(backend="radixlm", base_url=base, api_key=None, model="default")


async def send_all(base: str, work: list[list[int]], output_len: int, rate: float, seed: int
                   ) -> tuple[list[Result], float]:
    rng = random.Random(seed)
    cargs = client_args(base)
    tasks = []
    start = time.perf_counter()
    for prompt in work:
        tasks.append(asyncio.create_task(one_request(cargs, prompt, None, output_len)))
        if rate != float("inf"):
            await asyncio.sleep(rng.expovariate(rate))
    results = await asyncio.gather(*tasks)
    return results, time.perf_counter() - start


def sustainable_rate(args: argparse.Namespace, flags: list[str]) -> float:
    server = Server(flags)
    try:
        asyncio.run(send_all(server.base, prompts(args, 2), args.output_len, float("inf"), args.seed))  # warm-up
        results, elapsed = asyncio.run(send_all(server.base, prompts(args, args.saturate), args.output_len,
                                                float("inf"), args.seed))
    finally:
        server.stop()
    done = [r for r in results if r.ok]
    return len(done) / elapsed


def overload_row(args: argparse.Namespace, name: str, flags: list[str], rate: float) -> dict:
    count = max(1, round(rate * args.duration))
    server = Server(flags)
    try:
        asyncio.run(send_all(server.base, prompts(args, 2), args.output_len, float("inf"), args.seed))
        results, elapsed = asyncio.run(send_all(server.base, prompts(args, count), args.output_len, rate,
                                                args.seed + 1))
    finally:
        server.stop()
    served = [r for r in results if r.ok]
    refused = [r for r in results if not r.ok and " 503 " in r.error]
    other = [r for r in results if not r.ok and " 503 " not in r.error]
    return {"config": name, "offered": count / args.duration, "sent": count, "served": len(served),
            "refused": len(refused), "errors": len(other), "elapsed": elapsed,
            "served_rps": len(served) / elapsed, "goodput": sum(r.output_tokens for r in served) / elapsed,
            "ttft": percentiles([r.ttft for r in served]), "e2e": percentiles([r.e2e for r in served]),
            "first_error": other[0].error if other else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per configuration")
    parser.add_argument("--overload", type=float, default=2.0, help="offered rate / sustainable rate")
    parser.add_argument("--rate", type=float, default=None, help="sustainable rate (default: measured)")
    parser.add_argument("--saturate", type=int, default=32, help="requests at once that measure the rate")
    parser.add_argument("--max-queued-requests", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-flags", default="--max-total-tokens 16384 --max-running-requests 8",
                        help="flags of every server started (a string)")
    args = parser.parse_args()
    flags = args.server_flags.split()

    rate = args.rate or sustainable_rate(args, flags)
    offered = rate * args.overload
    print(f"sustainable rate {rate:.2f} req/s ({'given' if args.rate else 'measured'}); offering {offered:.2f} req/s "
          f"for {args.duration:g} s; prompts {args.input_len} tokens, outputs {args.output_len}; "
          f"server flags: {' '.join(flags)}", flush=True)
    rows = [overload_row(args, "no queue limit", flags, offered),
            overload_row(args, f"--max-queued-requests {args.max_queued_requests}",
                         flags + ["--max-queued-requests", str(args.max_queued_requests)], offered)]
    print(f"\n{'configuration':<28} {'sent':>5} {'served':>6} {'503':>5} {'err':>4} {'served/s':>9} "
          f"{'tok/s':>7} {'TTFT p50/p90/p99 (ms)':>30} {'E2E p50/p90/p99 (ms)':>30}")
    for r in rows:
        print(f"{r['config']:<28} {r['sent']:>5} {r['served']:>6} {r['refused']:>5} {r['errors']:>4} "
              f"{r['served_rps']:>9.2f} {r['goodput']:>7.1f} {r['ttft']:>30} {r['e2e']:>30}")
        if r["first_error"]:
            print(f"  first other error: {r['first_error']}")
    print("\n" + json.dumps({"sustainable_rps": rate, "offered_rps": offered, "rows": rows}))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
