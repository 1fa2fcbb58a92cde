"""Routing quality at scale, by simulation (issue #21): a discrete-event simulation of N engine workers behind the
REAL routing policies (``radixlm.router.policy.make_policy`` with ``RouterArgs``), on seeded synthetic traces
(bench/router_traces.py), reporting cache hit rate, throughput, TTFT and load imbalance per policy.

The policy sees what ``radixlm router`` feeds it (radixlm/router/server.py): the request's routing text and the
outstanding requests of every worker (routed, not finished), in the configured order; its eviction runs every
``eviction_interval_secs`` of simulated time in slices of the router's ``EVICTION_SLICE`` pops, and the
cache-aware policy's clock is the simulated clock.

Each worker models one engine (``SimWorker``): FCFS continuous batching with at most ``max_running`` requests;
a step is either a prefill of the waiting requests that fit (FCFS, up to ``prefill_budget`` uncached tokens, at
least one request; decodes pause meanwhile, as without mixed chunks) or one decode step of every running request;
a request's first token comes at the end of its prefill step.  Its prefix cache (``PrefixCacheModel``) holds
``cache_tokens`` tokens in pages of ``page`` tokens with LRU leaf-first eviction: a prompt is matched and inserted
at admission, prompt + answer inserted at finish (so a chat's next turn can hit its previous answer).  The KV of
running requests is not charged against ``cache_tokens`` (``max_running`` bounds it).

Cost model (``CostModel``), Llama-3.1-8B bf16 on one H200, from docs/benchmarks.md:
- decode step, by batch at short context: 4.73 ms (1), 5.58 ms (32), 7.47 ms (128): GPU run E, "Roofline and
  batch 1" (``one_batch.py --input-len 128 --output-len 128``); linear in between, the last slope beyond;
- plus KV reads, 3.6e-8 s per context token in the batch per step: GPU run H, 4 x 30,000-token contexts decode at
  9.16 ms/step against 4.81 ms interpolated at batch 4 (=> (9.16 - 4.81) ms / 120,000 tokens; the KV of one token,
  131 KB, at run E's 4.28 TB/s copy bandwidth is 3.1e-8 s);
- prefill: 1/44,000 s per uncached token (the compute-bound rate: 44,056-44,838 tok/s at batch 32-256 x 256 tokens,
  GPU run A static batch, H100; the H200 has the same bf16 tensor throughput) plus 1.55e-9 s per (new token,
  attended token) pair for attention (GPU run H: 4 x 30,000 tokens at 21,779 tok/s = 5.51 s, of which 2.73 s is
  the linear part; the rest over 4 x 30,000^2 / 2 pairs).

    PYTHONPATH=. python bench/router_sim.py                               # every trace, 8/16/64 workers
    PYTHONPATH=. python bench/router_sim.py --traces shared --workers 8 --policies cache_aware round_robin
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import itertools
import math
import statistics
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent))  # bench/ is not a package: its siblings, shadowing nothing

from router_traces import Session, chat_trace, shared_prompt_trace, tokens_text, working_set_tokens  # noqa: E402

from radixlm.router.policy import POLICIES, RouterArgs, RoutingPolicy, make_policy  # noqa: E402
from radixlm.router.server import EVICTION_SLICE  # noqa: E402


class PrefixCacheModel:
    """An exact LRU prefix cache over token pages, as an engine's radix cache with leaf-first LRU eviction.

    Only whole pages are cached (a sequence's last partial page is not).  A node is one page, keyed by (parent
    node, page tokens).  ``insert`` touches a path deepest page first, so every node is more recent in the LRU
    order than all its descendants: the least recent node is always a leaf, and evicting LRU-first is evicting
    the least recently used leaf, repeatedly, until at most ``capacity_tokens`` are held."""

    def __init__(self, capacity_tokens: int, page: int = 16) -> None:
        if page < 1 or capacity_tokens < 0:
            raise ValueError("page must be >= 1 and capacity_tokens >= 0")
        self.capacity_tokens = capacity_tokens
        self.page = page
        self._children: dict[tuple[int, tuple[int, ...]], int] = {}  # (parent, page tokens) -> node
        self._lru: OrderedDict[int, tuple[int, tuple[int, ...]]] = OrderedDict()  # node -> its key, LRU first
        self._ids = itertools.count(1)  # node 0 is the root: never stored, never evicted

    @property
    def tokens(self) -> int:
        return len(self._lru) * self.page

    def match(self, tokens: tuple[int, ...]) -> int:
        """Tokens of the longest cached prefix of ``tokens`` (a multiple of ``page``); changes nothing."""
        children, page, node = self._children, self.page, 0
        for i in range(0, len(tokens) - page + 1, page):
            node = children.get((node, tokens[i:i + page]), -1)
            if node < 0:
                return i
        return len(tokens) - len(tokens) % page

    def insert(self, tokens: tuple[int, ...]) -> None:
        """Cache every whole page of ``tokens`` as most recently used, then evict down to the capacity."""
        children, lru, page = self._children, self._lru, self.page
        path, node = [], 0
        for i in range(0, len(tokens) - page + 1, page):
            key = (node, tokens[i:i + page])
            node = children.get(key, -1)
            if node < 0:
                node = children[key] = next(self._ids)
                lru[node] = key
            path.append(node)
        touch = lru.move_to_end
        for node in reversed(path):
            touch(node)
        excess = len(lru) - self.capacity_tokens // page
        for _ in range(excess):
            del children[lru.popitem(last=False)[1]]


@dataclass(frozen=True)
class CostModel:
    """Seconds of one engine's steps (the module docstring gives the numbers' sources)."""

    prefill_s_per_token: float = 1 / 44_000
    attention_s_per_pair: float = 1.55e-9
    decode_points: tuple[tuple[int, float], ...] = ((1, 4.73e-3), (32, 5.58e-3), (128, 7.47e-3))
    kv_read_s_per_token: float = 3.6e-8

    def prefill_s(self, new: int, cached: int) -> float:
        """A prompt's prefill: ``new`` uncached tokens attending to ``cached`` cached ones and to each other."""
        return new * self.prefill_s_per_token + self.attention_s_per_pair * new * (cached + new / 2)

    def decode_step_s(self, batch: int, context_tokens: int) -> float:
        """One decode step of ``batch`` requests holding ``context_tokens`` tokens of KV in all."""
        xs = [b for b, _ in self.decode_points]
        i = min(max(bisect.bisect_left(xs, batch), 1), len(xs) - 1)
        (b0, t0), (b1, t1) = self.decode_points[i - 1], self.decode_points[i]
        return t0 + (t1 - t0) * (batch - b0) / (b1 - b0) + self.kv_read_s_per_token * context_tokens


class EventLoop:
    """Simulated time: callbacks run in (time, scheduling order); a cancelled event never runs."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, list]] = []
        self._seq = itertools.count()

    def at(self, t: float, fn: Callable[..., None], *args: object) -> list:
        """Run ``fn(*args)`` at time ``t`` (>= now); the returned handle cancels it."""
        if t < self.now:
            raise ValueError(f"cannot schedule at {t} < now {self.now}")
        handle = [fn, args]
        heapq.heappush(self._heap, (t, next(self._seq), handle))
        return handle

    @staticmethod
    def cancel(handle: list) -> None:
        handle[0] = None

    def run(self) -> None:
        while self._heap:
            t, _, (fn, args) = heapq.heappop(self._heap)
            if fn is not None:
                self.now = t
                fn(*args)


@dataclass(eq=False)
class SimRequest:
    session: Session
    turn: int
    prompt: tuple[int, ...]
    text: str  # the routing text: the prompt's
    arrival: float
    worker: str = ""
    cached: int = 0  # prompt tokens found in the worker's cache at admission
    first_token: float = math.nan
    finish: float = math.nan
    left: int = 0  # tokens still to decode while running

    @property
    def answer(self) -> tuple[int, ...]:
        return self.session.turns[self.turn].answer


class SimWorker:
    """One engine (see the module docstring).  ``done(request)`` is called at each request's last token."""

    def __init__(self, name: str, loop: EventLoop, cost: CostModel, cache: PrefixCacheModel, max_running: int,
                 prefill_budget: int, done: Callable[[SimRequest], None]) -> None:
        self.name, self.loop, self.cost, self.cache = name, loop, cost, cache
        self.max_running, self.prefill_budget, self.done = max_running, prefill_budget, done
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self._event: list | None = None  # the pending end of the current step or decode segment
        self._segment: tuple[float, float, int] | None = None  # (start, step seconds, steps) of a decode segment

    def submit(self, request: SimRequest) -> None:
        self.waiting.append(request)
        if self._event is None:
            self._step()
        elif self._segment is not None and len(self.running) < self.max_running:
            # A decode segment in progress: cut it after the step under way, so the prefill comes next.
            start, step_s, steps = self._segment
            done = max(1, math.ceil((self.loop.now - start) / step_s - 1e-9))
            if done < steps:
                self.loop.cancel(self._event)
                self._event = self.loop.at(start + done * step_s, self._decoded, done)
            self._segment = None

    def _step(self) -> None:
        now = self.loop.now
        if self.waiting and len(self.running) < self.max_running:
            admitted, new_total, seconds = [], 0, 0.0
            while self.waiting and len(self.running) + len(admitted) < self.max_running:
                request = self.waiting[0]
                cached = min(self.cache.match(request.prompt), len(request.prompt) - 1)  # >= 1 token computed
                new = len(request.prompt) - cached
                if admitted and new_total + new > self.prefill_budget:
                    break
                self.waiting.popleft()
                self.cache.insert(request.prompt)
                request.cached = cached
                admitted.append(request)
                new_total += new
                seconds += self.cost.prefill_s(new, cached)
            self._segment = None
            self._event = self.loop.at(now + seconds, self._prefilled, admitted)
        elif self.running:
            steps = min(r.left for r in self.running)
            context = sum(len(r.prompt) + len(r.answer) - r.left for r in self.running)
            step_s = self.cost.decode_step_s(len(self.running), context)
            self._segment = (now, step_s, steps)
            self._event = self.loop.at(now + steps * step_s, self._decoded, steps)
        else:
            self._event = self._segment = None

    def _prefilled(self, admitted: list[SimRequest]) -> None:
        for request in admitted:
            request.first_token = self.loop.now
            request.left = len(request.answer) - 1
            if request.left == 0:
                self._finish(request)
            else:
                self.running.append(request)
        self._step()

    def _decoded(self, steps: int) -> None:
        still = []
        for request in self.running:
            request.left -= steps
            if request.left == 0:
                self._finish(request)
            else:
                still.append(request)
        self.running = still
        self._step()

    def _finish(self, request: SimRequest) -> None:
        request.finish = self.loop.now
        self.cache.insert(request.prompt + request.answer)
        self.done(request)


@dataclass(frozen=True)
class SimConfig:
    workers: int
    cache_tokens: int  # per worker
    page: int = 16
    max_running: int = 128
    prefill_budget: int = 8192  # uncached tokens per prefill step (the engine's chunked-prefill size)
    cost: CostModel = field(default_factory=CostModel)


def simulate(trace: list[Session], args: RouterArgs, config: SimConfig, seed: int = 0) -> tuple[
        list[SimRequest], dict[str, int]]:
    """Every turn of ``trace`` through ``make_policy(args)`` onto ``config.workers`` workers; the finished requests
    in finishing order and the requests each worker was sent."""
    loop = EventLoop()
    policy: RoutingPolicy = make_policy(args, seed=seed, clock=lambda: loop.now)
    names = [f"http://w{i}" for i in range(config.workers)]
    outstanding = dict.fromkeys(names, 0)
    sent = dict.fromkeys(names, 0)
    finished: list[SimRequest] = []
    contexts: dict[int, tuple[tuple[int, ...], str]] = {}  # session -> (last prompt + answer, its text)
    prefix_texts = {id(p): tokens_text(p) for p in {id(s.prefix): s.prefix for s in trace}.values()}  # shared
    sessions_left = len(trace)

    def release(session: Session, k: int) -> None:
        turn = session.turns[k]
        if k == 0:
            prompt = session.prefix + turn.message
            text = prefix_texts[id(session.prefix)] + tokens_text(turn.message)
        else:
            context, context_text = contexts.pop(session.key)
            prompt, text = context + turn.message, context_text + tokens_text(turn.message)
        request = SimRequest(session, k, prompt, text, loop.now)
        request.worker = policy.select(text, outstanding)
        outstanding[request.worker] += 1
        sent[request.worker] += 1
        workers[request.worker].submit(request)

    def done(request: SimRequest) -> None:
        nonlocal sessions_left
        outstanding[request.worker] -= 1
        finished.append(request)
        session, k = request.session, request.turn + 1
        if k < len(session.turns):
            contexts[session.key] = (request.prompt + request.answer, request.text + tokens_text(request.answer))
            loop.at(loop.now + session.turns[k].think_s, release, session, k)
        else:
            sessions_left -= 1

    def evict() -> None:
        while not policy.evict(EVICTION_SLICE):
            pass
        if sessions_left:
            loop.at(loop.now + args.eviction_interval_secs, evict)

    workers = {name: SimWorker(name, loop, config.cost, PrefixCacheModel(config.cache_tokens, config.page),
                               config.max_running, config.prefill_budget, done) for name in names}
    for session in trace:
        loop.at(session.start_s, release, session, 0)
    loop.at(args.eviction_interval_secs, evict)
    loop.run()
    return finished, sent


@dataclass(frozen=True)
class Summary:
    requests: int
    hit_rate: float  # cached prompt tokens / prompt tokens
    span_s: float  # first release to last token
    req_per_s: float
    tok_per_s: float  # prompt + generated tokens per second of span
    ttft_mean_s: float
    ttft_p99_s: float
    imbalance: float  # max / mean requests per worker


def summarize(finished: list[SimRequest], sent: dict[str, int]) -> Summary:
    prompt = sum(len(r.prompt) for r in finished)
    tokens = prompt + sum(len(r.answer) for r in finished)
    span = max(r.finish for r in finished) - min(r.arrival for r in finished)
    ttft = sorted(r.first_token - r.arrival for r in finished)
    return Summary(len(finished), sum(r.cached for r in finished) / prompt, span, len(finished) / span,
                   tokens / span, statistics.fmean(ttft), ttft[min(len(ttft) - 1, math.ceil(0.99 * len(ttft)) - 1)],
                   max(sent.values()) / statistics.fmean(sent.values()))


def traces(names: list[str], workers: int, ns: argparse.Namespace) -> Iterator[tuple[str, list[Session]]]:
    """The named traces with a label each, sized per worker so every worker count sees the same regime: chat once
    per mean think time in ``ns.chat_think_s`` (0: each user sends its next turn at once, a closed loop whose
    throughput is what the fleet sustains at that concurrency), the shared-prompt trace once per offered load in
    ``ns.shared_rates_per_worker``."""
    if "chat" in names:
        for think_s in ns.chat_think_s:
            yield (f"chat, {ns.chat_users_per_worker} users/worker, think {think_s:g} s",
                   chat_trace(ns.chat_users_per_worker * workers, ns.chat_user_rate_per_worker * workers, ns.seed,
                              think_mean_s=think_s))
    if "shared" in names:
        for rate in ns.shared_rates_per_worker:
            yield (f"shared, {rate:g} req/s/worker",
                   shared_prompt_trace(ns.shared_groups_per_worker * workers, ns.shared_requests_per_worker * workers,
                                       rate * workers, ns.seed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traces", nargs="+", choices=["chat", "shared"], default=["chat", "shared"])
    parser.add_argument("--workers", nargs="+", type=int, default=[8, 16, 64])
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    parser.add_argument("--cache-tokens", nargs="+", type=int, default=[200_000],
                        help="per-worker prefix cache sizes to run (one table block each)")
    parser.add_argument("--page", type=int, default=16)
    parser.add_argument("--max-running", type=int, default=128)
    parser.add_argument("--prefill-budget", type=int, default=8192)
    parser.add_argument("--chat-users-per-worker", type=int, default=64)
    parser.add_argument("--chat-user-rate-per-worker", type=float, default=16.0, help="new conversations per s")
    parser.add_argument("--chat-think-s", nargs="+", type=float, default=[1.0, 0.0],
                        help="mean think times (one run each)")
    parser.add_argument("--shared-groups-per-worker", type=int, default=16)
    parser.add_argument("--shared-requests-per-worker", type=int, default=200)
    parser.add_argument("--shared-rates-per-worker", nargs="+", type=float, default=[10.0, 60.0],
                        help="offered loads, requests per s (one run each; 60 saturates every policy)")
    parser.add_argument("--max-tree-size", type=int, default=RouterArgs().max_tree_size,
                        help="the cache-aware policy's characters per worker (the router's default)")
    parser.add_argument("--balance-abs-threshold", type=int, default=RouterArgs().balance_abs_threshold)
    parser.add_argument("--seed", type=int, default=1)
    ns = parser.parse_args()
    print("| trace | cache tok/worker | workers | working set tok | policy | requests | hit % | req/s | tok/s | "
          "span s | TTFT mean s | TTFT p99 s | max/mean reqs | hit x RR | req/s x RR |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for cache_tokens, workers in itertools.product(ns.cache_tokens, ns.workers):
        for trace_name, trace in traces(ns.traces, workers, ns):
            report(trace_name, trace, SimConfig(workers, cache_tokens, ns.page, ns.max_running, ns.prefill_budget),
                   ns)


def report(trace_name: str, trace: list[Session], config: SimConfig, ns: argparse.Namespace) -> None:
    """One table block: every policy of ``ns.policies`` on ``trace``, with its ratios to round robin."""
    results: dict[str, Summary] = {}
    for policy in ns.policies:
        t0 = time.perf_counter()
        args = RouterArgs(policy=policy, max_tree_size=ns.max_tree_size,
                          balance_abs_threshold=ns.balance_abs_threshold)
        results[policy] = summarize(*simulate(trace, args, config, ns.seed))
        print(f"  ({trace_name}, {config.cache_tokens:,}, {config.workers}, {policy}: "
              f"{time.perf_counter() - t0:.1f} s wall)", file=sys.stderr, flush=True)
    rr = results.get("round_robin")
    for policy, s in results.items():
        ratios = f"{s.hit_rate / rr.hit_rate:.2f} | {s.req_per_s / rr.req_per_s:.2f}" if rr and rr.hit_rate else "|"
        print(f"| {trace_name} | {config.cache_tokens:,} | {config.workers} | {working_set_tokens(trace):,} | "
              f"{policy} | {s.requests:,} | {100 * s.hit_rate:.1f} | {s.req_per_s:.1f} | {s.tok_per_s:,.0f} | "
              f"{s.span_s:.1f} | {s.ttft_mean_s:.2f} | {s.ttft_p99_s:.2f} | {s.imbalance:.2f} | {ratios} |",
              flush=True)


if __name__ == "__main__":
    main()
