"""The router simulator's exact pieces (bench/router_sim.py, bench/router_traces.py): the worker's prefix cache
against a brute-force LRU model, the event loop's order, the cost model's interpolation, the traces' determinism
and prompt structure, and one small simulation's invariants."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[2] / "bench"))  # bench/ is not a package; appended: shadows nothing

import router_sim as rs  # noqa: E402
import router_traces as rt  # noqa: E402

from radixlm.router.policy import RouterArgs  # noqa: E402


class BruteForceCache:
    """Every cached page-aligned prefix with its last access; evicts the least recently used leaf."""

    def __init__(self, capacity_tokens: int, page: int) -> None:
        self.capacity, self.page = capacity_tokens, page
        self.seen: dict[tuple[int, ...], int] = {}
        self.clock = 0

    def prefixes(self, tokens: tuple[int, ...]) -> list[tuple[int, ...]]:
        return [tokens[:i] for i in range(self.page, len(tokens) + 1, self.page)]

    def match(self, tokens: tuple[int, ...]) -> int:
        return max([len(p) for p in self.prefixes(tokens) if p in self.seen], default=0)

    def insert(self, tokens: tuple[int, ...]) -> None:
        self.clock += 1
        for p in self.prefixes(tokens):
            self.seen[p] = self.clock
        while len(self.seen) * self.page > self.capacity:
            leaves = [p for p in self.seen
                      if not any(len(q) == len(p) + self.page and q[:len(p)] == p for q in self.seen)]
            del self.seen[min(leaves, key=self.seen.__getitem__)]


@pytest.mark.parametrize("page,capacity", [(1, 12), (2, 10), (3, 30), (4, 0)])
def test_prefix_cache_equals_brute_force(page: int, capacity: int) -> None:
    rng = random.Random(page * 100 + capacity)
    model, brute = rs.PrefixCacheModel(capacity, page), BruteForceCache(capacity, page)
    stems = [tuple(rng.randrange(3) for _ in range(rng.randint(0, 6))) for _ in range(5)]
    for _ in range(400):
        tokens = rng.choice(stems) + tuple(rng.randrange(3) for _ in range(rng.randint(0, 8)))
        assert model.match(tokens) == brute.match(tokens), tokens
        if rng.random() < 0.7:
            model.insert(tokens)
            brute.insert(tokens)
            assert model.tokens == len(brute.seen) * page <= capacity


def test_prefix_cache_evicts_the_least_recent_leaf_first() -> None:
    cache = rs.PrefixCacheModel(capacity_tokens=4, page=1)
    cache.insert((1, 2, 3))
    cache.insert((1, 5))  # 4 tokens: 1, 12, 123, 15
    cache.insert((7,))  # one over: the least recent leaf is 123 (12 is its ancestor and as old)
    assert (cache.match((1, 2, 3)), cache.match((1, 5)), cache.match((7,))) == (2, 2, 1)
    cache.insert((1, 2))  # touches 1, 12: now 15 is the least recent leaf
    cache.insert((8,))
    assert (cache.match((1, 5)), cache.match((1, 2)), cache.match((7,)), cache.match((8,))) == (1, 2, 1, 1)


def test_event_loop_runs_by_time_then_scheduling_order_and_skips_cancelled() -> None:
    loop, seen = rs.EventLoop(), []
    loop.at(2.0, seen.append, "c")
    loop.at(1.0, seen.append, "a")
    dropped = loop.at(1.0, seen.append, "x")
    loop.at(1.0, lambda: loop.at(1.0, seen.append, "b2"))  # same time, scheduled later: runs after "b"
    loop.at(1.0, seen.append, "b")
    loop.cancel(dropped)
    loop.run()
    assert seen == ["a", "b", "b2", "c"] and loop.now == 2.0
    with pytest.raises(ValueError):
        loop.at(1.0, seen.append, "past")


def test_cost_model_interpolates_the_measured_points() -> None:
    cost = rs.CostModel()
    assert cost.decode_step_s(1, 0) == pytest.approx(4.73e-3)
    assert cost.decode_step_s(32, 0) == pytest.approx(5.58e-3)
    assert cost.decode_step_s(80, 1000) == pytest.approx((5.58e-3 + 7.47e-3) / 2 + 3.6e-5)
    assert cost.decode_step_s(224, 0) == pytest.approx(7.47e-3 + (7.47e-3 - 5.58e-3))  # the last slope beyond
    assert cost.prefill_s(44_000, 0) == pytest.approx(1 + 1.55e-9 * 44_000 ** 2 / 2)


def test_worker_prefills_then_decodes_and_cuts_a_decode_run_for_an_arrival() -> None:
    """Prefill 1 ms a token; decode 10 ms a step at batch 1, 20 ms at batch 2.  A (10-token prompt, 5-token
    answer) at 0: prefilled at 0.01, decodes 4 steps from 0.01.  B (A's prompt + 10 tokens, 3-token answer) at
    0.025 cuts that run after its second step (0.03), is prefilled with 10 of its tokens cached (0.04), then both
    decode their last 2 tokens at batch 2 (0.08)."""
    cost = rs.CostModel(prefill_s_per_token=1e-3, attention_s_per_pair=0.0, decode_points=((1, 0.01), (2, 0.02)),
                        kv_read_s_per_token=0.0)
    loop, done = rs.EventLoop(), []
    worker = rs.SimWorker("w", loop, cost, rs.PrefixCacheModel(1000, page=1), max_running=4, prefill_budget=100,
                          done=done.append)
    def request(key: int, prompt: tuple[int, ...], answer: tuple[int, ...], arrival: float) -> rs.SimRequest:
        return rs.SimRequest(rt.Session(key, arrival, (), (rt.Turn(prompt, answer, 0.0),)), 0, prompt, "", arrival)

    a = request(0, tuple(range(10)), tuple(range(5)), 0.0)
    b = request(1, tuple(range(20)), tuple(range(3)), 0.025)
    loop.at(0.0, worker.submit, a)
    loop.at(0.025, worker.submit, b)
    loop.run()
    assert [(r is a, r.first_token, r.finish, r.cached) for r in done] == [
        (True, pytest.approx(0.01), pytest.approx(0.08), 0), (False, pytest.approx(0.04), pytest.approx(0.08), 10)]


def test_traces_are_deterministic_and_chat_prompts_extend_each_other() -> None:
    assert rt.chat_trace(5, 1.0, seed=3) == rt.chat_trace(5, 1.0, seed=3) != rt.chat_trace(5, 1.0, seed=4)
    assert rt.shared_prompt_trace(3, 7, 2.0, seed=3) == rt.shared_prompt_trace(3, 7, 2.0, seed=3)
    session = rt.chat_trace(1, 1.0, seed=5, turns=(3, 3))[0]
    p0, p1, p2 = (session.prompt(k) for k in range(3))
    assert p1 == p0 + session.turns[0].answer + session.turns[1].message
    assert p2 == p1 + session.turns[1].answer + session.turns[2].message
    shared = rt.shared_prompt_trace(2, 20, 2.0, seed=1)
    assert len({id(s.prefix) for s in shared}) == 2  # the groups' prompts are shared objects
    assert all(b.start_s > a.start_s for a, b in zip(shared, shared[1:]))
    assert rt.tokens_text((0, rt.VOCAB - 1)) == " aaa 999"
    assert len({rt.token_text(t) for t in range(0, rt.VOCAB, 97)}) == len(range(0, rt.VOCAB, 97))


def test_a_small_simulation_serves_every_turn_and_cache_aware_hits_more() -> None:
    trace = rt.shared_prompt_trace(groups=6, requests=120, rate_per_s=40.0, seed=2, system_len=(200, 300),
                                   question=(10, 20), answer=(5, 10))
    config = rs.SimConfig(workers=4, cache_tokens=600, page=4, max_running=8)
    results = {}
    for policy in ("cache_aware", "round_robin"):
        finished, sent = rs.simulate(trace, RouterArgs(policy=policy), config)
        assert sorted(r.session.key for r in finished) == list(range(120))
        assert sum(sent.values()) == 120
        assert all(r.arrival <= r.first_token <= r.finish for r in finished)
        results[policy] = rs.summarize(finished, sent)
    assert results["round_robin"].imbalance == 1.0
    assert results["cache_aware"].hit_rate > results["round_robin"].hit_rate
