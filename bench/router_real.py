"""Routers in front of real CPU workers (issue #21, "Real"): --workers ``radixlm serve`` processes of the embedded
model (each --threads threads) behind ``radixlm router --policy cache_aware``, ``radixlm router --policy
round_robin`` and SGLang's router (``python -m sglang_router.launch_router --policy cache_aware``; skipped with a
message when not importable), one router at a time, on shared-prefix workloads:

- ``shared-prefix``: --groups long system prompts (--system-words words each) x --questions short questions
  each, in a shuffled order, --concurrency in flight;
- ``multi-turn``: --sessions chats of --turns turns, each turn the whole conversation so far (the answers the
  model gave) plus a new user message; the sessions run concurrently, a session's turns in order.

Every request is a streamed ``/v1/chat/completions`` (greedy, ``ignore_eos``, --output-len tokens) with
``stream_options.include_usage``, after one warm-up request to each worker; the cache hit rate is the workers'
own count: the sum of ``usage.prompt_tokens_details.cached_tokens`` over the sum of ``usage.prompt_tokens``.  The workers' caches are
flushed (``POST /flush_cache`` on each) before every row.  TTFT: from sending to the first content token.

    python bench/router_real.py                                  # 2 workers, small sizes (a 2-core machine)
    python bench/router_real.py --workers 4 --threads 4 --groups 8 --questions 16 --sessions 16
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import random
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from router_load import free_port, router_command, stop, wait_healthy
from serving import post_stream

REPO = Path(__file__).resolve().parent.parent
WORDS = ("the", "weather", "river", "engine", "market", "garden", "signal", "harbor", "lantern", "copper",
         "forest", "letter", "window", "silver", "morning", "bridge", "island", "pencil", "thunder", "meadow")
ROUTERS = {"ours cache_aware": ("ours", "cache_aware"), "ours round_robin": ("ours", "round_robin"),
           "sglang cache_aware": ("sglang", "cache_aware")}


@dataclass
class Result:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    text: str = ""
    error: str = ""


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


async def chat(base: str, messages: list[dict[str, str]], output_len: int) -> Result:
    body = {"model": "m", "messages": messages, "max_tokens": output_len, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    result = Result()
    start = time.perf_counter()
    try:
        async for chunk in post_stream(base + "/v1/chat/completions", body, {}):
            if chunk.get("usage"):
                usage = chunk["usage"]
                result.prompt_tokens = usage["prompt_tokens"]
                result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
                result.output_tokens = usage["completion_tokens"]
            for choice in chunk.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    if not result.text:
                        result.ttft = time.perf_counter() - start
                    result.text += content
    except Exception as exc:  # a failed request is counted and reported
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def shared_prefix(base: str, args: argparse.Namespace) -> list[Result]:
    rng = random.Random(args.seed)
    systems = [f"You are assistant number {g}. " + words(rng, args.system_words) for g in range(args.groups)]
    prompts = [[{"role": "system", "content": s}, {"role": "user", "content": f"Question {q}: {words(rng, 12)}?"}]
               for s in systems for q in range(args.questions)]
    rng.shuffle(prompts)
    limit = asyncio.Semaphore(args.concurrency)

    async def one(messages: list[dict[str, str]]) -> Result:
        async with limit:
            return await chat(base, messages, args.output_len)

    return list(await asyncio.gather(*(one(m) for m in prompts)))


async def multi_turn(base: str, args: argparse.Namespace) -> list[Result]:
    rng = random.Random(args.seed + 1)
    openings = [f"You are assistant number {s}. " + words(rng, args.system_words // 2) for s in range(args.sessions)]

    async def session(s: int) -> list[Result]:
        messages = [{"role": "system", "content": openings[s]}]
        results = []
        for turn in range(args.turns):
            messages.append({"role": "user", "content": f"Turn {turn}: {words(rng, 16)}?"})
            result = await chat(base, messages, args.output_len)
            results.append(result)
            messages.append({"role": "assistant", "content": result.text})
        return results

    sessions = await asyncio.gather(*(session(s) for s in range(args.sessions)))
    return [r for results in sessions for r in results]


def start_workers(args: argparse.Namespace) -> tuple[list[subprocess.Popen], list[str]]:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    procs, urls = [], []
    for _ in range(args.workers):
        port = free_port()
        procs.append(subprocess.Popen([sys.executable, "-m", "radixlm.serve", "--port", str(port), "--random-seed",
                                       "0", "--max-total-tokens", str(args.max_total_tokens), "--log-level",
                                       "warning"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        urls.append(f"http://127.0.0.1:{port}")
    for proc, url in zip(procs, urls):
        wait_healthy(url, proc, timeout_s=600)
    return procs, urls


def flush(urls: list[str]) -> None:
    for url in urls:
        with urllib.request.urlopen(urllib.request.Request(url + "/flush_cache", method="POST"), timeout=60) as r:
            assert r.status == 200, f"{url}/flush_cache answered {r.status}"


def start_router(kind: str, policy: str, workers: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = router_command(kind, workers, port, None)
    command[command.index("--policy") + 1] = policy
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout_s=120)
    except BaseException:
        proc.kill()
        raise
    return proc, url


def quantile_ms(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1e3 if len(values) > 1 else float("nan")


def row(name: str, workload: str, results: list[Result], elapsed: float) -> str:
    ok = [r for r in results if not r.error]
    failed = [r for r in results if r.error]
    prompt = sum(r.prompt_tokens for r in ok)
    hit = sum(r.cached_tokens for r in ok) / prompt if prompt else float("nan")
    ttfts = [r.ttft for r in ok]
    errors = f"{len(failed)}" + (f" ({failed[0].error[:60]})" if failed else "")
    return (f"| {name} | {workload} | {len(ok)} | {100 * hit:.1f} | {len(ok) / elapsed:.2f} | "
            f"{sum(r.output_tokens for r in ok) / elapsed:.1f} | {quantile_ms(ttfts, 50):.0f} | "
            f"{quantile_ms(ttfts, 99):.0f} | {errors} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="OMP threads of each worker")
    parser.add_argument("--max-total-tokens", type=int, default=8192, help="each worker's KV pool")
    parser.add_argument("--routers", default=",".join(ROUTERS), help=f"of {', '.join(ROUTERS)}")
    parser.add_argument("--workloads", default="shared-prefix,multi-turn")
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--questions", type=int, default=6)
    parser.add_argument("--system-words", type=int, default=300)
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--output-len", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=4, help="shared-prefix: requests in flight")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    routers = [r.strip() for r in args.routers.split(",") if r.strip()]
    if any(ROUTERS[r][0] == "sglang" for r in routers) and importlib.util.find_spec("sglang_router") is None:
        print("sglang_router is not importable (pip install sglang-router): skipping the sglang router")
        routers = [r for r in routers if ROUTERS[r][0] != "sglang"]
    workloads = {"shared-prefix": shared_prefix, "multi-turn": multi_turn}
    procs, workers = start_workers(args)
    try:
        for url in workers:  # a first request each, so that no row pays a worker's warm-up
            asyncio.run(chat(url, [{"role": "user", "content": "Hello"}], args.output_len))
        print(f"{args.workers} workers x {args.threads} threads; shared-prefix: {args.groups} system prompts of "
              f"{args.system_words} words x {args.questions} questions, {args.concurrency} in flight; multi-turn: "
              f"{args.sessions} sessions x {args.turns} turns; {args.output_len} output tokens", flush=True)
        print("| router | workload | requests | cache hit % | req/s | output tok/s | TTFT p50 ms | TTFT p99 ms | "
              "errors |")
        print("|---|---|---|---|---|---|---|---|---|", flush=True)
        for name in routers:
            kind, policy = ROUTERS[name]
            proc, url = start_router(kind, policy, workers)
            try:
                for workload in [w for w in args.workloads.split(",") if w]:
                    flush(workers)
                    start = time.perf_counter()
                    results = asyncio.run(workloads[workload](url, args))
                    print(row(name, workload, results, time.perf_counter() - start), flush=True)
            finally:
                stop(proc)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
