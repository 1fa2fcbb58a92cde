"""The scheduler with LoRA requests against the fake executor (no model): the batch names each row's adapter,
admission keeps at most ``--max-loras-per-batch`` adapters in a batch without starving anyone, and the radix
cache never serves one adapter's KV to another (the fake executor's shadow KV checks every slot a row reads
against the row's adapter, and its model's tokens depend on the adapter)."""

from __future__ import annotations

import random

import pytest

from radixlm.core import Req
from radixlm.scheduler import Scheduler

from fake_executor import next_token
from test_scheduler_model_free import make, req, run

ADAPTERS = [None, "a", "b", "c"]


def lora_req(rid: str, prompt: list[int], adapter: str | None, max_new: int = 8) -> Req:
    r = req(rid, prompt, max_new)
    r.lora_name = adapter
    return r


def alone(prompt: list[int], n: int, adapter: str | None) -> list[int]:
    seq, out = tuple(prompt), []
    for _ in range(n):
        out.append(next_token(seq, adapter))
        seq += (out[-1],)
    return out


def batch_adapters(sched: Scheduler) -> set[str]:
    holders = sched.running + ([sched.chunked_req] if sched.chunked_req is not None else [])
    return {r.lora_name for r in holders if r.lora_name is not None}


def test_fake_model_depends_on_the_adapter() -> None:
    prompt = [5, 6, 7, 8]
    outputs = {str(a): alone(prompt, 6, a) for a in ADAPTERS}
    assert len({tuple(o) for o in outputs.values()}) == len(ADAPTERS)


@pytest.mark.parametrize("config", [
    {}, dict(chunked_prefill_size=16), dict(chunked_prefill_size=16, enable_mixed_chunk=True),
    dict(schedule_policy="lpm"), dict(disable_overlap_schedule=True),
    dict(max_total_tokens=128, chunked_prefill_size=16, schedule_conservativeness=0.3),
    dict(max_total_tokens=128, page_size=4, chunked_prefill_size=12),
])
def test_mixed_adapters_get_their_own_tokens_within_the_adapter_limit(config: dict) -> None:
    rng = random.Random(1)
    systems = [[rng.randrange(2, 50) for _ in range(20)] for _ in range(2)]
    reqs = [lora_req(str(i), systems[i % 2] + [rng.randrange(2, 50) for _ in range(rng.randrange(1, 12))],
                     ADAPTERS[rng.randrange(4)], max_new=rng.randrange(1, 12)) for i in range(24)]
    config = {"max_total_tokens": 512, **config}
    sched, worker = make(max_loras_per_batch=2, **config)
    seen: list[int] = []

    def check(s: Scheduler) -> None:
        assert len(batch_adapters(s)) <= 2
        seen.append(len(batch_adapters(s)))

    run(sched, reqs, on_step=check)
    for r in reqs:
        assert r.output_ids == alone(r.origin_input_ids, r.sampling_params.max_new_tokens, r.lora_name), r.rid
    assert max(seen) == 2  # the limit was reached, not merely respected by a sequential schedule
    for batch in worker.batches:
        if batch.lora_names is not None:
            assert len({n for n in batch.lora_names if n is not None}) <= 2
            assert any(n is not None for n in batch.lora_names)


def test_batch_names_each_rows_adapter_and_none_without_any() -> None:
    sched, worker = make(max_loras_per_batch=4)
    run(sched, [lora_req("base", [3, 4, 5], None, max_new=2)])
    assert all(b.lora_names is None for b in worker.batches)
    worker.batches.clear()
    run(sched, [lora_req("x", [6, 7], "a", max_new=2), lora_req("y", [8, 9], None, max_new=2),
                lora_req("z", [10, 11], "b", max_new=2)])
    assert worker.batches[0].lora_names == ["a", None, "b"]


def test_same_prompt_shares_its_prefix_only_within_an_adapter() -> None:
    prompt = list(range(2, 30))
    sched, _ = make(max_loras_per_batch=2)
    first = run(sched, [lora_req("base", prompt, None, max_new=3)])[0]
    a1 = run(sched, [lora_req("a1", prompt, "a", max_new=3)])[0]
    b1 = run(sched, [lora_req("b1", prompt, "b", max_new=3)])[0]
    a2 = run(sched, [lora_req("a2", prompt, "a", max_new=3)])[0]
    base2 = run(sched, [lora_req("base2", prompt, None, max_new=3)])[0]
    assert [r.cached_tokens for r in (first, a1, b1, a2, base2)] == [0, 0, 0, len(prompt) - 1, len(prompt) - 1]
    assert a1.output_ids == a2.output_ids == alone(prompt, 3, "a") != first.output_ids


def test_unloaded_adapter_namespace_is_dropped() -> None:
    prompt = list(range(2, 20))
    sched, _ = make()
    run(sched, [lora_req("a1", prompt, "a", max_new=2)])
    cached = sched.tree_cache.total_size()
    assert sched.tree_cache.drop_namespace("a") == cached
    assert run(sched, [lora_req("a2", prompt, "a", max_new=2)])[0].cached_tokens == 0


def test_request_over_the_adapter_limit_waits_while_base_requests_pass() -> None:
    """Limit 1: "a" runs; "b" is refused and becomes the barrier; the "a" request behind it is held back even
    though its adapter is resident, the base request is admitted; "b" runs once "a" has finished, then the held
    "a" request after "b" has finished."""
    sched, _ = make(max_loras_per_batch=1)
    a1 = lora_req("a1", [2, 3, 4], "a", max_new=6)
    sched.add_request(a1)
    sched.step()
    b1, a2, base = (lora_req("b1", [5, 6], "b", max_new=4), lora_req("a2", [7, 8], "a", max_new=2),
                    lora_req("base", [9, 10], None, max_new=2))
    for r in (b1, a2, base):
        sched.add_request(r)
    order: list[str] = []

    def record(s: Scheduler) -> None:
        for r in s.running:
            if r.rid not in order:
                order.append(r.rid)
        assert len(batch_adapters(s)) <= 1  # so "b1" ran after "a1" finished, and "a2" after "b1"

    run(sched, [a1, b1, a2, base], add=False, on_step=record)
    assert order[:2] == ["a1", "base"] and order[2:] == ["b1", "a2"]
    assert sched.prefill.adapter_barrier is None
    for r in (a1, b1, a2, base):
        assert r.output_ids == alone(r.origin_input_ids, r.sampling_params.max_new_tokens, r.lora_name)


def test_a_stream_of_resident_adapter_requests_does_not_starve_another_adapter() -> None:
    """Limit 1, a new "a" request every step: "b" waits only for the "a" requests admitted before it was
    refused; no "a" request arriving later runs before it."""
    sched, _ = make(max_loras_per_batch=1, max_running_requests=64, max_total_tokens=4096)
    b = lora_req("b", [5, 6, 7], "b", max_new=2)
    stream = [lora_req(f"a{i}", [2, 3, i % 40 + 2], "a", max_new=4) for i in range(40)]
    sched.add_request(stream[0])
    sched.step()
    sched.add_request(b)
    started_before_b: list[str] = []
    for r in stream[1:]:
        sched.add_request(r)
        sched.step()
        if not b.output_ids:
            started_before_b += [x.rid for x in sched.running if x.lora_name == "a" and x.rid not in started_before_b]
    run(sched, stream + [b], add=False)
    assert b.output_ids == alone([5, 6, 7], 2, "b")
    assert started_before_b == ["a0"]  # b's refusal held back every later "a" request


def test_could_admit_agrees_with_admit() -> None:
    rng = random.Random(3)
    reqs = [lora_req(str(i), [rng.randrange(2, 50) for _ in range(rng.randrange(2, 30))], ADAPTERS[i % 4],
                     max_new=rng.randrange(1, 10)) for i in range(30)]
    sched, _ = make(max_loras_per_batch=2, max_total_tokens=160, max_running_requests=6)
    admit, checks = sched.prefill.admit, []

    def checked_admit(running: list[Req], ratio: float, decode_rows: int = 0) -> list[Req]:
        expected = None if sched.prefill.chunked_req is not None else sched.prefill.could_admit(running, ratio)
        got = admit(running, ratio, decode_rows)
        if expected is not None:
            assert bool(got) == expected
            checks.append(expected)
        return got

    sched.prefill.admit = checked_admit
    run(sched, reqs)
    assert True in checks and False in checks


def test_in_batch_prefix_sharing_defers_only_requests_of_the_same_adapter() -> None:
    prompt = list(range(2, 42))  # longer than IN_BATCH_PREFIX_MIN
    for adapters, first_rows in ((["a", "b"], 2), (["a", "a"], 1)):
        sched, worker = make(max_loras_per_batch=2)
        reqs = [lora_req(str(i), prompt + [i + 2], adapter, max_new=2) for i, adapter in enumerate(adapters)]
        run(sched, reqs)
        assert len(worker.batches[0].req_pool_indices) == first_rows
        assert [r.cached_tokens for r in reqs] == [0, 0 if first_rows == 2 else len(prompt)]
