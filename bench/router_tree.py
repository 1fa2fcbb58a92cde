"""Micro-benchmark of the router's prefix tree and cache-aware policy (issue #21) on synthetic chat-like prompts:
a few shared system prompts, each request one of them plus a unique user suffix.

Per (prompts, workers): inserts/s (each prompt into the tree for worker i % workers), matches/s (fresh prompts
sharing the system prompts), cache-aware selects/s (match + insert, the router's per-request work), then an
eviction pass cutting every worker to half its size in slices of --slice heap pops: its rate and its worst
slice (how long routing can wait behind the eviction timer).

    python bench/router_tree.py                      # 10k and 100k prompts, 8 and 64 workers
    python bench/router_tree.py --prompts 2000 --workers 4
"""

from __future__ import annotations

import argparse
import random
import time

from radixlm.router import CacheAwarePolicy, PrefixTree

WORDS = ("the of and to in is you that it for on with as are this be at have from or one had by word but not what "
         "all were we when your can said there use an each which she do how their if will up other about out many "
         "then them these so some her would make like him into time has look two more write go see number way could "
         "people my than first water been call who oil its now find long down day did get come made may part").split()


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(WORDS, k=n))


def make_prompts(rng: random.Random, n: int, systems: list[str], suffix_words: int) -> list[str]:
    """``n`` chat-like prompts: a system prompt (chosen uniformly) and a unique user turn."""
    return [f"{rng.choice(systems)}\nUser {i}: {words(rng, suffix_words)}\nAssistant:" for i in range(n)]


def run(n: int, num_workers: int, systems: list[str], suffix_words: int, slice_pops: int, seed: int) -> dict:
    rng = random.Random(seed)
    prompts = make_prompts(rng, n, systems, suffix_words)
    queries = make_prompts(rng, n, systems, suffix_words)
    workers = [f"http://worker-{w}" for w in range(num_workers)]

    tree = PrefixTree()
    t0 = time.perf_counter()
    for i, text in enumerate(prompts):
        tree.insert(text, workers[i % num_workers], float(i))
    t_insert = time.perf_counter() - t0

    t0 = time.perf_counter()
    matched = sum(tree.match(text).matched for text in queries)
    t_match = time.perf_counter() - t0

    policy = CacheAwarePolicy(clock=time.monotonic)
    loads = dict.fromkeys(workers, 0)
    t0 = time.perf_counter()
    for text in prompts:
        policy.select(text, loads)
    t_select = time.perf_counter() - t0

    sizes = [tree.size(w) for w in workers]
    target = sum(sizes) // (2 * num_workers)
    evicted = slices = 0
    worst = 0.0
    t0 = time.perf_counter()
    for w in workers:
        while tree.size(w) > target:
            s0 = time.perf_counter()
            evicted += tree.evict(w, target, slice_pops).chars
            worst = max(worst, time.perf_counter() - s0)
            slices += 1
    t_evict = time.perf_counter() - t0
    return dict(n=n, workers=num_workers, chars=sum(map(len, prompts)), owned=sum(sizes),
                insert=n / t_insert, match=n / t_match, select=n / t_select,
                hit=matched / sum(map(len, queries)), evict_s=t_evict, evicted=evicted, slices=slices,
                worst_ms=worst * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", default="10000,100000", help="comma-separated prompt counts")
    parser.add_argument("--workers", default="8,64", help="comma-separated worker counts")
    parser.add_argument("--systems", type=int, default=16, help="distinct system prompts")
    parser.add_argument("--system-words", type=int, default=200, help="words per system prompt (~5 chars each)")
    parser.add_argument("--suffix-words", type=int, default=40, help="words per unique user turn")
    parser.add_argument("--slice", type=int, default=1024, help="heap pops per eviction slice")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    systems = [f"System {s}: {words(rng, args.system_words)}" for s in range(args.systems)]
    print(f"{args.systems} system prompts of {args.system_words} words, user turns of {args.suffix_words} words; "
          f"eviction to half of each worker's size in slices of {args.slice} pops")
    header = (f"{'prompts':>8} {'workers':>7} {'MB text':>8} {'inserts/s':>10} {'matches/s':>10} {'selects/s':>10} "
              f"{'match %':>7} {'evict s':>8} {'evicted Mchar':>13} {'Mchar/s':>8} {'slices':>7} {'worst ms':>8}")
    print(header)
    for n in (int(x) for x in args.prompts.split(",")):
        for w in (int(x) for x in args.workers.split(",")):
            r = run(n, w, systems, args.suffix_words, args.slice, args.seed)
            print(f"{r['n']:8d} {r['workers']:7d} {r['chars'] / 1e6:8.1f} {r['insert']:10,.0f} {r['match']:10,.0f} "
                  f"{r['select']:10,.0f} {100 * r['hit']:7.1f} {r['evict_s']:8.2f} {r['evicted'] / 1e6:13.2f} "
                  f"{r['evicted'] / 1e6 / r['evict_s']:8.1f} {r['slices']:7d} {r['worst_ms']:8.2f}", flush=True)


if __name__ == "__main__":
    main()
