"""Continuous batching gives every request exactly the tokens it would get alone: with and without the radix
cache, chunked or whole prefill, and under memory pressure that forces eviction and retraction."""

from __future__ import annotations

import pytest

from radixlm.config import ServerArgs
from radixlm.core import Req
from radixlm.executor import ModelRunner, ModelWorker
from radixlm.executor.static_batch import generate_static
from radixlm.models.loader import resolve_model_config
from radixlm.sampling import SamplingParams
from radixlm.scheduler import Scheduler, run_to_completion

SYSTEM = "You are a helpful assistant. Answer briefly and precisely. " * 3


def prompts(tokenizer) -> list[list[int]]:
    questions = ["What is 2+2?", "Name a color.", "Why is the sky blue?", "Say hello in Spanish.",
                 "What is the capital of Italy?", "Count to five."]
    shared = [tokenizer(SYSTEM + q).input_ids for q in questions]
    other = [tokenizer(t).input_ids for t in ["def add(a, b):", "The quick brown fox", "Roses are red,"]]
    return shared + other


def params(i: int) -> SamplingParams:
    # mixed lengths, and one sampled request (seeded) among greedy ones
    if i == 4:
        return SamplingParams(temperature=0.8, top_p=0.9, seed=1234, max_new_tokens=20, ignore_eos=True)
    return SamplingParams(temperature=0.0, max_new_tokens=8 + 4 * (i % 4), ignore_eos=i % 2 == 0)


def run_scheduler(path: str, ids: list[list[int]], **kwargs) -> tuple[list[Req], Scheduler]:
    args = ServerArgs(model_path=path, device="cpu", dtype="float32", random_seed=0, **kwargs)
    sched = Scheduler(args, ModelWorker(ModelRunner(args, resolve_model_config(args))))
    reqs = []
    for i, p in enumerate(ids):
        sp = params(i)
        sp.normalize()
        reqs.append(Req(rid=str(i), origin_input_ids=list(p), sampling_params=sp, seed=sp.seed or i))
    run_to_completion(sched, reqs)
    return reqs, sched


@pytest.fixture(scope="module")
def reference(embedded_path, embedded_tokenizer):
    ids = prompts(embedded_tokenizer)
    reqs, sched = run_scheduler(embedded_path, ids, max_total_tokens=8192, disable_radix_cache=True,
                                chunked_prefill_size=-1)
    return ids, [r.output_ids for r in reqs]


def test_greedy_equals_static_batch(reference, embedded_worker):
    ids, outs = reference
    for i, (p, out) in enumerate(zip(ids, outs)):
        if i == 4:
            continue
        sp = params(i)
        assert generate_static(embedded_worker, [p], sp) == [out], f"request {i}"


@pytest.mark.parametrize("kwargs", [
    dict(max_total_tokens=8192),                                    # radix cache on
    dict(max_total_tokens=8192, chunked_prefill_size=16),            # chunked prefill
    dict(max_total_tokens=8192, schedule_policy="lpm", max_running_requests=3),
    dict(max_total_tokens=128, chunked_prefill_size=32, schedule_conservativeness=0.3),  # eviction + retraction
    dict(max_total_tokens=8192, page_size=16),                       # paged KV, whole-page prefix matches
    dict(max_total_tokens=128, page_size=4, chunked_prefill_size=24, schedule_conservativeness=0.3),
    dict(max_total_tokens=8192, disable_overlap_schedule=True),      # the reference runs overlapped
    dict(max_total_tokens=128, chunked_prefill_size=32, schedule_conservativeness=0.3, disable_overlap_schedule=True),
])
def test_outputs_identical(reference, embedded_path, kwargs):
    ids, ref = reference
    reqs, sched = run_scheduler(embedded_path, ids, **kwargs)
    assert [r.output_ids for r in reqs] == ref
    assert all(r.finished_reason["type"] == "length" or r.finished_reason["type"] == "stop" for r in reqs)
    assert sched.is_idle()
    # every KV slot is back: free or held by the cache, nothing leaked to a finished request
    allocator = sched.memory.allocator
    assert allocator.available_size() + sched.tree_cache.total_size() == allocator.size
    assert sched.tree_cache.protected_size() == 0
    if kwargs["max_total_tokens"] == 128:
        assert sched.decode.num_retracted > 0


def test_shared_prefix_reports_cached_tokens(embedded_path, embedded_tokenizer):
    ids = prompts(embedded_tokenizer)[:3]
    args = ServerArgs(model_path=embedded_path, device="cpu", dtype="float32", random_seed=0, max_total_tokens=4096)
    sched = Scheduler(args, ModelWorker(ModelRunner(args, resolve_model_config(args))))
    first = Req(rid="a", origin_input_ids=ids[0], sampling_params=SamplingParams(temperature=0.0, max_new_tokens=2))
    run_to_completion(sched, [first])
    assert first.cached_tokens == 0
    common = 0
    while ids[0][common] == ids[1][common]:
        common += 1
    second = Req(rid="b", origin_input_ids=ids[1], sampling_params=SamplingParams(temperature=0.0, max_new_tokens=2))
    run_to_completion(sched, [second])
    assert second.cached_tokens == common


def test_abort_returns_memory(embedded_path, embedded_tokenizer):
    ids = prompts(embedded_tokenizer)[:2]
    args = ServerArgs(model_path=embedded_path, device="cpu", dtype="float32", random_seed=0, max_total_tokens=4096,
                      disable_radix_cache=True)
    sched = Scheduler(args, ModelWorker(ModelRunner(args, resolve_model_config(args))))
    reqs = [Req(rid=str(i), origin_input_ids=p, sampling_params=SamplingParams(temperature=0.0, max_new_tokens=50))
            for i, p in enumerate(ids)]
    for r in reqs:
        sched.add_request(r)
    for _ in range(3):
        sched.step()
    sched.abort_request("0")
    assert reqs[0].finished_reason["type"] == "abort"
    while not sched.is_idle():
        sched.step()
    assert len(reqs[1].output_ids) == 50
    assert sched.memory.allocator.available_size() == 4096


def test_context_length_rejected(embedded_path):
    args = ServerArgs(model_path=embedded_path, device="cpu", dtype="float32", random_seed=0, max_total_tokens=4096, context_length=32)
    sched = Scheduler(args, ModelWorker(ModelRunner(args, resolve_model_config(args))))
    too_long = Req(rid="x", origin_input_ids=[5] * 40, sampling_params=SamplingParams())
    sched.add_request(too_long)
    assert too_long.finished_reason["type"] == "abort" and "context length" in too_long.finished_reason["message"]
    capped = Req(rid="y", origin_input_ids=[5] * 20, sampling_params=SamplingParams(max_new_tokens=100, ignore_eos=True))
    run_to_completion(sched, [capped])
    assert capped.seq_len == 32 and capped.finished_reason["type"] == "length"


def test_burst_of_shared_prompts_computes_the_prefix_once(embedded_path, embedded_tokenizer):
    """Requests arriving together with a common uncached prefix: one prefills it, the others wait one step and
    reuse it from the cache (in-batch prefix sharing)."""
    ids = prompts(embedded_tokenizer)[:6]
    common = min(next(i for i, (a, b) in enumerate(zip(ids[0], x)) if a != b) for x in ids[1:])
    assert common > 32
    args = ServerArgs(model_path=embedded_path, device="cpu", dtype="float32", random_seed=0, max_total_tokens=4096)
    sched = Scheduler(args, ModelWorker(ModelRunner(args, resolve_model_config(args))))
    reqs = [Req(rid=str(i), origin_input_ids=p, sampling_params=SamplingParams(temperature=0.0, max_new_tokens=3))
            for i, p in enumerate(ids)]
    run_to_completion(sched, reqs)
    assert reqs[0].cached_tokens == 0
    assert all(r.cached_tokens >= common for r in reqs[1:]), [r.cached_tokens for r in reqs]


@pytest.mark.parametrize("constraint", [{}, {"regex": "[a-z ]{100}"}])
def test_overlap_schedule_launches_ahead(embedded_path, embedded_tokenizer, constraint):
    """With the overlap schedule a decode step leaves the next one launched and unread (grammar-constrained
    requests too: their mask is built after the previous token is read); without it, none."""
    for disable in (False, True):
        args = ServerArgs(model_path=embedded_path, device="cpu", dtype="float32", random_seed=0, max_total_tokens=4096,
                          disable_overlap_schedule=disable)
        sched = Scheduler(args, ModelWorker(ModelRunner(args, resolve_model_config(args))))
        sp = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True, **constraint)
        sp.normalize()
        req = Req(rid="a", origin_input_ids=embedded_tokenizer("Hello there").input_ids, sampling_params=sp)
        sched.add_request(req)
        ahead = []
        while not sched.is_idle():
            sched.step()
            ahead.append(sched.inflight is not None)
        assert len(req.output_ids) == 6
        assert any(ahead) != disable


def test_overlap_chains_past_finished_requests_and_a_full_pool(embedded_path, embedded_tokenizer):
    """The overlap schedule keeps chaining when requests of the batch finish (the next step takes the rows of the
    others) and while the waiting queue cannot be admitted; outputs, penalties and seeded sampling included, equal
    those without it."""
    ids = prompts(embedded_tokenizer)

    def run(disable: bool) -> tuple[list[list[int]], int, int]:
        args = ServerArgs(model_path=embedded_path, device="cpu", dtype="float32", random_seed=0, max_total_tokens=160,
                          chunked_prefill_size=-1, disable_overlap_schedule=disable)
        sched = Scheduler(args, ModelWorker(ModelRunner(args, resolve_model_config(args))))
        reqs = []
        for i, p in enumerate(ids):
            sp = SamplingParams(temperature=0.7 if i % 3 == 0 else 0.0, seed=i, frequency_penalty=0.5,
                                presence_penalty=0.3, max_new_tokens=6 + 3 * i, ignore_eos=True)
            sp.normalize()
            reqs.append(Req(rid=str(i), origin_input_ids=list(p), sampling_params=sp, seed=i))
            sched.add_request(reqs[-1])
        shrunk = blocked = 0
        while not sched.is_idle():
            before = sched.inflight
            sched.step()
            after = sched.inflight
            if before is not None and after is not None:
                shrunk += len(after.step.reqs) < len(before.step.reqs)
                blocked += bool(sched.waiting)
        return [r.output_ids for r in reqs], shrunk, blocked

    on, shrunk, blocked = run(False)
    off, _, _ = run(True)
    assert on == off
    assert shrunk > 0, "no step was chained onto a batch that lost finished requests"
    assert blocked > 0, "no step was chained while requests waited for memory"
