"""Routing policies of the router (issue #21): which worker serves a request, and the router's flags.

A policy sees the request text and the current load of each candidate worker (outstanding requests, kept by the
router process) and returns one of those workers.  Policies are single-threaded (the router's asyncio loop) and
never block: the cache-aware policy's eviction runs in bounded slices from a timer (``evict``).

Flag names and defaults follow SGLang's router where it has them.
"""

from __future__ import annotations

import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from radixlm.router.prefix_tree import PrefixTree

__all__ = ["POLICIES", "CacheAwarePolicy", "PowerOfTwoPolicy", "RandomPolicy", "RoundRobinPolicy", "RouterArgs",
           "RoutingPolicy", "make_policy"]

POLICIES = ("cache_aware", "round_robin", "random", "power_of_two")


@dataclass(frozen=True)
class RouterArgs:
    """The ``radixlm router`` flags (SGLang's names).  ``max_tree_size``: characters per worker that the
    cache-aware tree keeps after an eviction pass."""

    worker_urls: tuple[str, ...] = ()
    policy: str = "cache_aware"
    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    eviction_interval_secs: float = 60.0
    max_tree_size: int = 2**26
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "worker_urls", tuple(self.worker_urls))
        problems = []
        if self.policy not in POLICIES:
            problems.append(f"--policy {self.policy!r}: expected one of {', '.join(POLICIES)}")
        if not 0.0 <= self.cache_threshold <= 1.0:
            problems.append(f"--cache-threshold {self.cache_threshold}: expected a value in [0, 1]")
        if self.balance_abs_threshold < 0:
            problems.append(f"--balance-abs-threshold {self.balance_abs_threshold}: expected >= 0")
        if self.balance_rel_threshold < 1.0:
            problems.append(f"--balance-rel-threshold {self.balance_rel_threshold}: expected >= 1")
        if self.eviction_interval_secs <= 0:
            problems.append(f"--eviction-interval-secs {self.eviction_interval_secs}: expected > 0")
        if self.max_tree_size < 0:
            problems.append(f"--max-tree-size {self.max_tree_size}: expected >= 0")
        if len(set(self.worker_urls)) != len(self.worker_urls):
            problems.append("--worker-urls: a worker is listed twice")
        if problems:
            raise ValueError("invalid router arguments:\n  " + "\n  ".join(problems))


class RoutingPolicy(ABC):
    """Picks a worker per request.  ``loads`` maps each candidate worker (the healthy ones, in the router's
    configured order) to its outstanding requests; it must not be empty (the router answers 503 before asking)."""

    name: str

    @abstractmethod
    def select(self, text: str, loads: Mapping[str, int]) -> str:
        """The worker that serves a request with this text; one of ``loads``' keys."""

    def remove_worker(self, worker: str) -> None:
        """Forget what the policy keeps about a worker that left."""

    def evict(self, budget: int | None = None) -> bool:
        """One bounded slice of background upkeep; True when nothing is left to do."""
        return True


def _check(loads: Mapping[str, int]) -> None:
    if not loads:
        raise ValueError("no worker to route to")


class RoundRobinPolicy(RoutingPolicy):
    """The workers of ``loads`` in turn: the i-th request goes to ``list(loads)[i % len(loads)]``."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def select(self, text: str, loads: Mapping[str, int]) -> str:
        _check(loads)
        workers = list(loads)
        worker = workers[self._next % len(workers)]
        self._next += 1
        return worker


class RandomPolicy(RoutingPolicy):
    """A uniformly random worker; ``seed`` makes the sequence reproducible."""

    name = "random"

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def select(self, text: str, loads: Mapping[str, int]) -> str:
        _check(loads)
        return self._rng.choice(list(loads))


class PowerOfTwoPolicy(RoutingPolicy):
    """Two distinct random workers, the less loaded one (ties: the first drawn)."""

    name = "power_of_two"

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def select(self, text: str, loads: Mapping[str, int]) -> str:
        _check(loads)
        workers = list(loads)
        if len(workers) == 1:
            return workers[0]
        a, b = self._rng.sample(workers, 2)
        return b if loads[b] < loads[a] else a


class CacheAwarePolicy(RoutingPolicy):
    """SGLang's cache-aware routing over a ``PrefixTree`` of the text each worker was sent.

    With ``lo``/``hi`` the smallest/largest load among the candidates:
    1. imbalanced (``hi - lo > balance_abs_threshold`` and ``hi > balance_rel_threshold * lo``): the least loaded
       worker (ties: the first in ``loads``' order);
    2. else, with ``ratio`` = matched characters / characters of the text (0 for an empty text): ``ratio >
       cache_threshold`` -> the worker owning the longest match (the most recently used one on a tie);
    3. else the worker with the smallest tree (ties: the first in ``loads``' order).
    The text is then inserted for the chosen worker in every case, at ``clock()``.
    Per-worker trees are cut back to ``max_tree_size`` characters by ``evict`` (the router's timer), LRU first.
    """

    name = "cache_aware"

    def __init__(self, cache_threshold: float = 0.3, balance_abs_threshold: int = 64,
                 balance_rel_threshold: float = 1.5, max_tree_size: int = 2**26,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.max_tree_size = max_tree_size
        self.tree = PrefixTree()
        self._clock = clock
        self._evict_from = 0  # the worker the next eviction slice starts with, so slices rotate fairly

    def select(self, text: str, loads: Mapping[str, int]) -> str:
        _check(loads)
        lo_worker = min(loads, key=loads.__getitem__)  # min() keeps the first of equal keys
        lo, hi = loads[lo_worker], max(loads.values())
        if hi - lo > self.balance_abs_threshold and hi > self.balance_rel_threshold * lo:
            worker = lo_worker
        else:
            match = self.tree.match(text, loads.keys())
            ratio = match.matched / len(text) if text else 0.0
            if ratio > self.cache_threshold and match.worker is not None:
                worker = match.worker
            else:
                worker = min(loads, key=self.tree.size)
        self.tree.insert(text, worker, self._clock())
        return worker

    def remove_worker(self, worker: str) -> None:
        self.tree.remove_worker(worker)

    def evict(self, budget: int | None = None) -> bool:
        """Cut every worker's tree back to ``max_tree_size``, popping at most ``budget`` heap entries in all
        (None: no bound).  True when every worker is within the limit."""
        workers = self.tree.workers()
        if not workers:
            return True
        start = self._evict_from % len(workers)
        self._evict_from += 1
        left = budget
        for worker in workers[start:] + workers[:start]:
            if left is not None and left <= 0:
                break
            if self.tree.size(worker) > self.max_tree_size:
                stats = self.tree.evict(worker, self.max_tree_size, left)
                if left is not None:
                    left -= stats.pops
        return all(self.tree.size(w) <= self.max_tree_size for w in self.tree.workers())


def make_policy(args: RouterArgs, seed: int | None = None, clock: Callable[[], float] = time.monotonic
                ) -> RoutingPolicy:
    """The policy ``args.policy`` names, configured from ``args``."""
    if args.policy == "cache_aware":
        return CacheAwarePolicy(args.cache_threshold, args.balance_abs_threshold, args.balance_rel_threshold,
                                args.max_tree_size, clock)
    if args.policy == "round_robin":
        return RoundRobinPolicy()
    if args.policy == "random":
        return RandomPolicy(seed)
    return PowerOfTwoPolicy(seed)
