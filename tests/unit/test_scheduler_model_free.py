"""The scheduler against a fake executor (no model): admission, chunked prefill, mixed steps, eviction,
retraction, abort, grammar waits, the overlap schedule and the request states, checked in milliseconds.

Every run asserts that each request gets exactly the tokens the fake model gives it alone, and after every
step that each KV page is in exactly one place and that every slot a row reads holds the KV of its own tokens
(``fake_executor``)."""

from __future__ import annotations

import random

import pytest

from radixlm.config import ServerArgs
from radixlm.core import ForwardMode, Req, ReqState
from radixlm.lifecycle import IllegalTransition, TRANSITIONS
from radixlm.sampling import SamplingParams
from radixlm.scheduler import Scheduler

from fake_executor import EOS, FakeGrammarBackend, FakeWorker, check_memory, next_token, patch_matchers


def make(max_total_tokens: int = 512, page_size: int = 1, max_running_requests: int = 16,
         **kwargs) -> tuple[Scheduler, FakeWorker]:
    worker = FakeWorker(max_total_tokens, page_size, max_running_requests)
    args = ServerArgs(device="cpu", grammar_backend="none", page_size=page_size, max_total_tokens=max_total_tokens,
                      random_seed=0, attention_backend="torch_native", **kwargs)
    return Scheduler(args, worker), worker


def req(rid: str, prompt: list[int], max_new: int = 8, **params) -> Req:
    params.setdefault("ignore_eos", True)
    sp = SamplingParams(temperature=0.0, max_new_tokens=max_new, **params)
    sp.normalize()
    return Req(rid=rid, origin_input_ids=list(prompt), sampling_params=sp)


def alone(prompt: list[int], n: int) -> list[int]:
    """What the fake model generates for ``prompt`` with nothing else around."""
    seq, out = tuple(prompt), []
    for _ in range(n):
        out.append(next_token(seq))
        seq += (out[-1],)
    return out


def run(sched: Scheduler, reqs: list[Req], max_steps: int = 5000, on_step=None, add: bool = True) -> list[Req]:
    """Add ``reqs`` (unless already added) and step until they have finished and the scheduler is idle."""
    for r in reqs if add else []:
        sched.add_request(r)
    for _ in range(max_steps):
        if all(r.finished for r in reqs) and sched.is_idle():
            return reqs
        sched.step()
        check_memory(sched)
        if on_step is not None:
            on_step(sched)
    raise AssertionError("requests did not finish")


def workload(seed: int = 0, n: int = 12) -> list[Req]:
    """Prompts that share prefixes (a few system prompts, some repeated whole), various lengths."""
    rng = random.Random(seed)
    systems = [[rng.randrange(2, 50) for _ in range(rng.randrange(5, 40))] for _ in range(3)]
    reqs = []
    for i in range(n):
        prompt = systems[i % 3] + [rng.randrange(2, 50) for _ in range(rng.randrange(1, 30))]
        reqs.append(req(str(i), prompt, max_new=rng.randrange(1, 20)))
    return reqs


CONFIGS = {
    "default": {},
    "chunked": dict(chunked_prefill_size=16),
    "mixed": dict(chunked_prefill_size=16, enable_mixed_chunk=True),
    "lpm": dict(schedule_policy="lpm", max_running_requests=3),
    "no_overlap": dict(disable_overlap_schedule=True),
    "no_cache": dict(disable_radix_cache=True),
    "pressure": dict(max_total_tokens=96, chunked_prefill_size=16, schedule_conservativeness=0.3),
    "pressure_paged": dict(max_total_tokens=96, page_size=4, chunked_prefill_size=12, schedule_conservativeness=0.3),
    "pressure_mixed": dict(max_total_tokens=96, chunked_prefill_size=16, schedule_conservativeness=0.3,
                           enable_mixed_chunk=True),
    "paged16": dict(page_size=16),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_request_gets_the_tokens_of_the_model_alone(name):
    sched, worker = make(**CONFIGS[name])
    reqs = run(sched, workload())
    for r in reqs:
        assert r.output_ids == alone(r.origin_input_ids, r.sampling_params.max_new_tokens), r.rid
        assert r.state is ReqState.FINISHED and r.finished_reason["type"] == "length"
    allocator = sched.memory.allocator
    assert allocator.available_size() + sched.tree_cache.total_size() == allocator.size
    assert sched.tree_cache.protected_size() == 0
    if name.startswith("pressure"):
        assert sched.decode.num_retracted > 0 and sched.tree_cache.num_evicted_tokens > 0
    if name == "no_cache":
        assert sched.tree_cache.total_size() == 0


def test_admission_limits():
    """No step holds more than --max-running-requests rows, nor more than --max-prefill-tokens new prompt tokens
    unless it is one prompt that is longer (without chunking it runs alone rather than never)."""
    sched, worker = make(max_running_requests=3, max_prefill_tokens=40, chunked_prefill_size=-1)
    reqs = run(sched, workload(1) + [req("long", list(range(2, 50)) * 2)])
    assert max(b.batch_size for b in worker.batches) <= 3
    extends = [b for b in worker.batches if b.mode is ForwardMode.EXTEND]
    assert all(b.num_tokens <= 40 or b.batch_size == 1 for b in extends)
    assert any(b.num_tokens > 40 for b in extends) and reqs[-1].output_ids == alone(reqs[-1].origin_input_ids, 8)


def test_chunked_prefill_alternates_with_decode():
    """A long prompt is prefilled in chunks of --chunked-prefill-size while an earlier request keeps decoding
    between the chunks; the sampled token of an unfinished chunk is discarded."""
    sched, worker = make(chunked_prefill_size=16)
    short, long = req("s", [5, 6, 7], max_new=30), req("l", list(range(2, 50)) * 2, max_new=4)
    sched.add_request(short)
    sched.step()  # prefill of the short one
    run(sched, [long])
    modes = [(b.mode, b.num_tokens) for b in worker.batches[1:]]
    chunks = [n for m, n in modes if m is ForwardMode.EXTEND]
    assert chunks == [16] * 6, chunks
    first, last = modes.index((ForwardMode.EXTEND, 16)), len(modes) - 1 - modes[::-1].index((ForwardMode.EXTEND, 16))
    between = [m for m, _ in modes[first:last]]
    assert between.count(ForwardMode.DECODE) >= 5, "decode starved while the prompt was chunked"
    assert long.output_ids == alone(long.origin_input_ids, 4)
    assert short.output_ids == alone(short.origin_input_ids, 30)


def test_mixed_steps_carry_the_decode_rows():
    """With --enable-mixed-chunk every chunk runs in one MIXED step with one token of each running request (the
    prefill rows first), within the chunk budget, so decoding never waits for a prompt."""
    sched, worker = make(chunked_prefill_size=16, enable_mixed_chunk=True)
    a, b = req("a", [5, 6, 7], max_new=30), req("b", [9, 8], max_new=30)
    for r in (a, b):
        sched.add_request(r)
    sched.step()  # admitted together, now decoding
    long = req("l", list(range(2, 50)) * 2, max_new=4)
    run(sched, [long])
    mixed = [x for x in worker.batches if x.mode is ForwardMode.MIXED]
    assert len(mixed) == 7  # 96 prompt tokens in chunks of 16 - 2 decode rows
    for batch in mixed:
        assert batch.num_tokens <= 16
        assert batch.extend_lens[-2:] == [1, 1] and batch.extend_lens[0] > 1
    assert a.output_ids == alone(a.origin_input_ids, 30) and b.output_ids == alone(b.origin_input_ids, 30)


def test_prefix_cache_and_in_batch_sharing():
    """A repeated prompt is served from the radix cache; two new prompts sharing 40 uncached tokens are
    prefilled one step apart, so the second reuses the first's KV."""
    sched, worker = make()
    prompt = list(range(2, 45))
    first = run(sched, [req("a", prompt)])[0]
    again = run(sched, [req("b", prompt)])[0]
    assert first.cached_tokens == 0 and again.cached_tokens == len(prompt) - 1
    shared = [7] * 40
    x, y = req("x", shared + [3, 4]), req("y", shared + [5, 6])
    run(sched, [x, y])
    assert x.cached_tokens == 0 and y.cached_tokens >= 40
    assert y.output_ids == alone(y.origin_input_ids, 8)


def test_eviction_takes_the_least_recently_used_prefix():
    sched, worker = make(max_total_tokens=128)
    old, recent = list(range(2, 42)), list(range(10, 50))
    run(sched, [req("old", old, max_new=1)])
    run(sched, [req("recent", recent, max_new=1)])
    run(sched, [req("new", [3] * 70, max_new=2)])  # needs room: evicts
    assert sched.tree_cache.num_evicted_tokens > 0
    hit = run(sched, [req("recent2", recent, max_new=1)])[0]
    assert hit.cached_tokens == len(recent) - 1, "the most recently used prefix was evicted first"


def test_retraction_sends_the_least_advanced_request_back():
    """A pool too small for every running request's growth retracts one (DECODING -> WAITING), whose KV stays in
    the cache; it resumes later and still gets its tokens."""
    sched, worker = make(max_total_tokens=64, schedule_conservativeness=0.05)
    reqs = [req(str(i), [2 + i] * 10, max_new=20) for i in range(3)]
    moves = []
    original = Req.move_to

    def spy(self, state):
        moves.append((self.rid, self.state, state))
        original(self, state)

    try:
        Req.move_to = spy
        run(sched, reqs)
    finally:
        Req.move_to = original
    assert sched.decode.num_retracted > 0
    assert any(old is ReqState.DECODING and new is ReqState.WAITING for _, old, new in moves)
    assert all(new in TRANSITIONS[old] for _, old, new in moves)
    for r in reqs:
        assert r.output_ids == alone(r.origin_input_ids, 20)


def test_a_request_longer_than_the_pool_is_admitted_after_a_retraction():
    """After a retraction the decode reserve is a request's whole remaining budget (ratio 1.0) and only decode
    steps decay it: a request asking for more new tokens than the pool holds is still admitted alone (it can
    use no more than its context, the pool), and ends at the pool's length."""
    sched, _ = make(max_total_tokens=64, schedule_conservativeness=0.3)
    sched.decode.new_token_ratio = 1.0  # as right after a retraction
    r = run(sched, [req("long", [5] * 5, max_new=80)])[0]
    assert r.finished_reason == {"type": "length", "length": 59}
    assert r.output_ids == alone([5] * 5, 59)


@pytest.mark.parametrize("where", ["waiting", "running", "chunked", "in_flight"])
def test_abort_anywhere_returns_memory_and_spares_the_others(where):
    sched, worker = make(chunked_prefill_size=8, max_running_requests=2 if where == "waiting" else 16)
    reqs = [req("a", list(range(2, 30)), max_new=30), req("b", [4, 5, 6], max_new=30),
            req("c", [9] * 5, max_new=30)]
    for r in reqs:
        sched.add_request(r)
    victim = {"waiting": reqs[2], "running": reqs[1], "chunked": reqs[0], "in_flight": reqs[1]}[where]
    there = {"waiting": lambda: victim in sched.waiting and sched.running,
             "running": lambda: victim in sched.running and sched.inflight is None,
             "chunked": lambda: sched.chunked_req is victim and sched.chunked_req.kv_len > 8,
             "in_flight": lambda: sched.inflight is not None and victim in sched.inflight.step.reqs}[where]
    for _ in range(40):
        if there():
            break
        sched.step()
        check_memory(sched)
    assert there()
    assert sched.abort_request(victim.rid) is victim
    assert victim.finished_reason == {"type": "abort", "message": "aborted"} and victim.req_pool_idx is None
    check_memory(sched)
    out_before = list(victim.output_ids)
    run(sched, [r for r in reqs if r is not victim], add=False)
    assert victim.output_ids == out_before, "an aborted request got tokens"
    for r in reqs:
        if r is not victim:
            assert r.output_ids == alone(r.origin_input_ids, 30)
    assert sched.tree_cache.protected_size() == 0


def test_grammar_requests_wait_for_compilation(monkeypatch):
    """A constrained request waits in GRAMMAR_COMPILING without blocking others; once compiled it runs under its
    mask (here: a grammar that allows one fixed token sequence and then ends the request); a failed compilation
    aborts it with the error."""
    patch_matchers(monkeypatch)
    sched, worker = make()
    sched.grammars.backend = backend = FakeGrammarBackend()
    plain = req("plain", [3, 4, 5], max_new=6)
    constrained = req("c", [3, 4, 5], max_new=20, regex="x")
    broken = req("bad", [6, 7], max_new=20, regex="(")
    for r in (plain, constrained, broken):
        sched.add_request(r)
    assert constrained.state is ReqState.GRAMMAR_COMPILING and broken.state is ReqState.GRAMMAR_COMPILING
    for _ in range(4):
        sched.step()
    assert len(plain.output_ids) >= 3 and not constrained.output_ids
    script = [11, 12, 13, 14]
    backend.futures[0].set_result(script)
    backend.futures[1].set_exception(ValueError("regex: unbalanced parenthesis"))
    run(sched, [plain, constrained, broken], add=False)
    assert constrained.output_ids == script and constrained.finished_reason == {"type": "stop", "matched": 14}
    assert broken.finished_reason["type"] == "abort" and "unbalanced" in broken.finished_reason["message"]
    assert plain.output_ids == alone(plain.origin_input_ids, 6)
    assert any(m is not None for m in worker.masks)


def test_overlap_chains_decode_steps_on_placeholders():
    """With the overlap schedule a decode step is launched before the previous one is read, naming the previous
    step's samples by placeholder; outputs are identical without it, and then no step is planned ahead."""
    outputs = {}
    for disable in (False, True):
        sched, worker = make(disable_overlap_schedule=disable)
        reqs = run(sched, workload(2))
        outputs[disable] = [r.output_ids for r in reqs]
        chained = [b for b in worker.batches if b.mode.is_decode and min(b.input_ids) < 0]
        assert bool(chained) != disable
    assert outputs[False] == outputs[True]


def test_finished_requests_drop_the_token_of_the_step_in_flight():
    """A request that stops at step N is already in step N+1 (launched before N was read); that token is
    dropped and its KV (the request's own last token) is cached with the rest."""
    sched, worker = make()
    stop = alone([2, 3, 4], 3)[-1]
    short = req("s", [2, 3, 4], max_new=10, stop_token_ids=[stop])
    long = req("l", [5, 6], max_new=10)
    run(sched, [short, long])
    assert short.output_ids == alone([2, 3, 4], 3) and short.finished_reason == {"type": "stop", "matched": stop}
    assert long.output_ids == alone([5, 6], 10)


def test_eos_and_prefill_only_requests():
    eos_at = [t for t in range(2, 50) if next_token((t,)) == EOS]
    sched, worker = make()
    prefill_only = req("p", [9, 9, 9, 9], max_new=0)
    run(sched, [prefill_only])
    assert prefill_only.output_ids == [] and prefill_only.finished_reason == {"type": "length", "length": 0}
    assert sched.tree_cache.total_size() >= 4  # its prompt was cached for the requests that share it
    if eos_at:
        r = run(sched, [req("e", [eos_at[0]], max_new=5, ignore_eos=False)])[0]
        assert r.output_ids == [EOS] and r.finished_reason["type"] == "stop"


def test_request_states_follow_the_table():
    r = req("x", [2, 3])
    r.move_to(ReqState.WAITING)
    with pytest.raises(IllegalTransition):
        r.move_to(ReqState.DECODING)  # never decoded without a prefill
    r.finish({"type": "abort", "message": "aborted"})
    r.finish({"type": "length", "length": 1})  # a finished request keeps its first reason
    assert r.finished_reason["type"] == "abort" and r.state is ReqState.FINISHED
    with pytest.raises(IllegalTransition):
        r.move_to(ReqState.WAITING)
    assert all(s in TRANSITIONS for s in ReqState) and not TRANSITIONS[ReqState.FINISHED]


def test_requests_that_cannot_fit_finish_at_once():
    sched, worker = make(max_total_tokens=32)
    empty, huge = req("e", []), req("h", list(range(2, 40)))
    sched.add_request(empty)
    sched.add_request(huge)
    assert empty.finished_reason["message"] == "the prompt is empty"
    assert "does not fit the KV cache" in huge.finished_reason["message"]
    assert sched.is_idle()


def test_embedded_prompt_positions_and_mrope_reach_the_batch():
    """Prompt positions given as embeddings ride on the batch at their token offsets, and the prefix cache stops
    before them (their placeholder ids do not identify the content); M-RoPE positions are [3, tokens], continuing
    at index + delta after the prompt."""
    import torch

    sched, worker = make()
    embeds = torch.randn(3, 8)
    a = req("a", [2, 3, 4, 5, 0, 0, 0, 6], max_new=2)
    a.input_embeds = [(4, embeds)]
    a.mrope_positions = torch.tensor([[0, 1, 2, 3, 4, 4, 4, 5], [0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5, 5, 9]])
    a.mrope_delta = -2
    run(sched, [a])
    prefill, decode = worker.batches[0], worker.batches[1]
    assert prefill.input_embeds[0][0] == 4 and torch.equal(prefill.input_embeds[0][1], embeds)
    assert prefill.mrope_positions.shape == (3, 8)
    assert decode.mrope_positions.tolist() == [[6], [6], [6]]  # index 8 (the first output) + delta
    b = run(sched, [req("b", [2, 3, 4, 5, 0, 0, 0, 6], max_new=2)])[0]
    assert b.cached_tokens <= 4
