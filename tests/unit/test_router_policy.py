"""The router's policies with exact expectations: each rule of the cache-aware policy (threshold edges, the
imbalance rule needing both thresholds, the smallest-tree fallback), round robin order, seeded random and
power-of-two choices, RouterArgs validation and make_policy."""

from __future__ import annotations

import itertools
import random

import pytest

from radixlm.router import (CacheAwarePolicy, PowerOfTwoPolicy, RandomPolicy, RoundRobinPolicy, RouterArgs,
                            make_policy)


class Clock:
    """A deterministic clock shared by the policy and a test's own inserts, so times never decrease."""

    def __init__(self) -> None:
        self._ticks = itertools.count()

    def __call__(self) -> float:
        return float(next(self._ticks))


def cache_aware(**kw) -> CacheAwarePolicy:
    return CacheAwarePolicy(clock=Clock(), **kw)


IDLE = {"a": 0, "b": 0}


def test_no_match_goes_to_the_smallest_tree_then_the_text_is_inserted() -> None:
    policy = cache_aware()
    assert policy.select("x" * 10, IDLE) == "a"  # both empty: the first in order
    assert policy.tree.size("a") == 10
    assert policy.select("y" * 4, IDLE) == "b"  # no match: b's tree (0) is the smaller
    assert policy.select("z" * 3, IDLE) == "b"  # b has 4 < 10
    assert policy.select("w", IDLE) == "b"  # 7 < 10
    assert (policy.tree.size("a"), policy.tree.size("b")) == (10, 8)


def test_match_ratio_threshold_edges() -> None:
    policy = cache_aware(cache_threshold=0.3)
    policy.select("p" * 10, IDLE)  # -> a
    policy.select("q" * 100, IDLE)  # -> b (smaller tree)
    policy.tree.insert("r" * 200, "b", 2)
    policy.tree.insert("s" * 500, "a", 3)  # a's tree (510) is now the larger
    assert policy.select("ppp" + "t" * 7, IDLE) == "b"  # ratio exactly 0.3: the smallest tree (b: 300 < 510)
    assert policy.select("pppp" + "u" * 6, IDLE) == "a"  # ratio 0.4 > 0.3: a owns the match
    assert policy.select("", IDLE) == "b"  # empty text: ratio 0 -> smallest tree (b 310 < a 516)


def test_best_match_is_the_most_recent_owner_of_the_deepest_node() -> None:
    clock = Clock()
    policy = CacheAwarePolicy(cache_threshold=0.5, clock=clock)
    policy.tree.insert("shared system prompt", "a", clock())
    policy.tree.insert("shared system prompt", "b", clock())
    assert policy.select("shared system prompt!", IDLE) == "b"
    policy.tree.insert("shared system prompt", "a", clock())
    assert policy.select("shared system prompt?", IDLE) == "a"


def test_match_only_among_candidate_workers() -> None:
    policy = cache_aware()
    policy.tree.insert("abcdefgh", "gone", 1)
    policy.tree.insert("abcd", "a", 2)
    assert policy.select("abcdefgh", {"a": 0, "b": 0}) == "a"  # 4/8 by a; "gone" is no candidate


@pytest.mark.parametrize("loads, imbalanced", [
    ({"a": 65, "b": 0}, True),    # 65 - 0 > 64 and 65 > 1.5 * 0
    ({"a": 64, "b": 0}, False),   # difference exactly 64: not > 64
    ({"a": 200, "b": 134}, False),  # difference 66 > 64 but 200 <= 1.5 * 134 = 201
    ({"a": 202, "b": 134}, True),  # 68 > 64 and 202 > 201
    ({"a": 201, "b": 134}, False),  # 67 > 64 but 201 is not > 201
])
def test_imbalance_needs_both_thresholds(loads: dict[str, int], imbalanced: bool) -> None:
    policy = cache_aware()
    policy.tree.insert("cached prompt", "a", 0)
    policy.tree.insert("z" * 1000, "a", 0)  # a's tree is big, b's empty: the fallback would also pick b
    chosen = policy.select("cached prompt", loads)
    assert chosen == ("b" if imbalanced else "a")
    assert policy.tree.match("cached prompt", [chosen]).matched == len("cached prompt")  # inserted for it


def test_imbalance_routes_to_the_shortest_queue_among_many() -> None:
    policy = cache_aware()
    assert policy.select("t", {"a": 100, "b": 7, "c": 3, "d": 3}) == "c"  # ties: the first in order
    assert policy.tree.size("c") == 1


def test_remove_worker_and_eviction_slices() -> None:
    policy = cache_aware(max_tree_size=20, cache_threshold=0.99)  # every request to the smaller tree
    loads = {"a": 0, "b": 0}
    for i in range(30):
        policy.select(f"request {i:02d} " + "x" * 10, loads)
    assert policy.tree.size("a") > 20 and policy.tree.size("b") > 20
    rounds = 0
    while not policy.evict(budget=2):
        rounds += 1
    assert rounds > 3
    assert policy.tree.size("a") <= 20 and policy.tree.size("b") <= 20
    policy.remove_worker("a")
    assert policy.tree.size("a") == 0 and policy.tree.workers() == ["b"]


def test_round_robin_order() -> None:
    policy = RoundRobinPolicy()
    loads = {"a": 9, "b": 0, "c": 5}
    assert [policy.select("", loads) for _ in range(7)] == ["a", "b", "c", "a", "b", "c", "a"]


def test_random_is_seeded() -> None:
    loads = {"a": 0, "b": 0, "c": 0}
    policy = RandomPolicy(seed=3)
    rng = random.Random(3)
    assert [policy.select("", loads) for _ in range(20)] == [rng.choice(list(loads)) for _ in range(20)]


def test_power_of_two_takes_the_less_loaded_of_its_draws() -> None:
    loads = {"a": 5, "b": 1, "c": 9, "d": 5}
    policy, rng = PowerOfTwoPolicy(seed=7), random.Random(7)
    for _ in range(50):
        x, y = rng.sample(list(loads), 2)
        assert policy.select("", loads) == (y if loads[y] < loads[x] else x)
    assert PowerOfTwoPolicy(seed=1).select("", {"only": 3}) == "only"


@pytest.mark.parametrize("policy", [RoundRobinPolicy(), RandomPolicy(0), PowerOfTwoPolicy(0), cache_aware()])
def test_no_worker_is_refused(policy) -> None:
    with pytest.raises(ValueError, match="no worker"):
        policy.select("x", {})


def test_router_args_and_make_policy() -> None:
    args = RouterArgs(worker_urls=["http://w0", "http://w1"])
    assert args.worker_urls == ("http://w0", "http://w1")
    assert (args.policy, args.cache_threshold, args.balance_abs_threshold, args.balance_rel_threshold,
            args.eviction_interval_secs) == ("cache_aware", 0.3, 64, 1.5, 60.0)
    policy = make_policy(args)
    assert isinstance(policy, CacheAwarePolicy) and policy.max_tree_size == args.max_tree_size
    for name, cls in [("round_robin", RoundRobinPolicy), ("random", RandomPolicy),
                      ("power_of_two", PowerOfTwoPolicy)]:
        assert isinstance(make_policy(RouterArgs(policy=name), seed=0), cls)
    assert "secret" not in repr(RouterArgs(api_key="secret"))
    with pytest.raises(ValueError) as err:
        RouterArgs(policy="fastest", cache_threshold=1.5, balance_rel_threshold=0.5, worker_urls=["u", "u"])
    for flag in ("--policy", "--cache-threshold", "--balance-rel-threshold", "--worker-urls"):
        assert flag in str(err.value)
