"""Unit tests for radixlm.sampling: params validation, batch tensors, penalties, sampler."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from radixlm.errors import InvalidRequestError
from radixlm.sampling import Sampler, SamplingBatchInfo, SamplingParams
from radixlm.sampling.sampler import counter_uniform

M64 = (1 << 64) - 1


def make_info(
    params: list[SamplingParams],
    vocab_size: int,
    seeds: list[int] | None = None,
    prompt_ids: list[list[int]] | None = None,
    output_ids: list[list[int]] | None = None,
    eos_token_ids: list[int] | None = None,
) -> SamplingBatchInfo:
    for p in params:
        p.normalize()
        p.verify(vocab_size)
    bs = len(params)
    return SamplingBatchInfo.from_requests(
        params,
        seeds=seeds if seeds is not None else list(range(bs)),
        prompt_ids=prompt_ids if prompt_ids is not None else [[] for _ in range(bs)],
        output_ids=output_ids if output_ids is not None else [[] for _ in range(bs)],
        eos_token_ids=eos_token_ids or [],
        vocab_size=vocab_size,
        device="cpu",
    )


def logits_from_probs(probs: list[float], rows: int) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float32).log().expand(rows, -1).contiguous()


# ---------------------------------------------------------------- SamplingParams


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.1}, "min_p"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": -2}, "top_k"),
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"presence_penalty": -2.5}, "presence_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": 2.1}, "repetition_penalty"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"min_new_tokens": -1}, "min_new_tokens"),
        ({"min_new_tokens": 10, "max_new_tokens": 5}, "min_new_tokens"),
        ({"n": 0}, "n"),
        ({"json_schema": "{}", "regex": "a+"}, "regex"),
        ({"logit_bias": {"abc": 1.0}}, "logit_bias"),
        ({"logit_bias": {"-1": 1.0}}, "logit_bias"),
        ({"logit_bias": {100: 1.0}}, "logit_bias"),
        ({"logit_bias": {"3": 101.0}}, "logit_bias"),
        ({"logit_bias": {True: 1.0}}, "logit_bias"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"n": 129}, "n"),
        ({"stop": [str(i) for i in range(17)]}, "stop"),
        ({"stop": "x" * 257}, "stop"),
        ({"stop_regex": [str(i) for i in range(9)]}, "stop_regex"),
        ({"stop_regex": "a" * 257}, "stop_regex"),
        ({"stop_regex": "(unclosed"}, "stop_regex"),
        ({"stop_regex": "a*"}, "stop_regex"),  # matches the empty string: would stop before any output
        ({"stop_regex": ["ok", "(.{1,60}){1,60}"]}, "stop_regex"),  # unrolls to more than MAX_STOP_REGEX_PROGRAM
        ({"stop_regex": r"\d(?=x)"}, "stop_regex"),  # lookahead: the text ahead is not known yet
        ({"stop_token_ids": list(range(257))}, "stop_token_ids"),
        ({"logit_bias": {str(i): 1.0 for i in range(1025)}}, "logit_bias"),
        ({"json_schema": " " * (256 * 1024 + 1)}, "json_schema"),
        ({"regex": "a" * (256 * 1024 + 1)}, "regex"),
        ({"ebnf": "a" * (256 * 1024 + 1)}, "ebnf"),
        ({"structural_tag": "a" * (256 * 1024 + 1)}, "structural_tag"),
    ],
)
def test_verify_rejects_invalid_field(kwargs: dict[str, Any], field: str) -> None:
    """A user error (InvalidRequestError, a ValueError) whose message and ``param`` name the field."""
    p = SamplingParams(**kwargs)
    with pytest.raises(InvalidRequestError, match=field) as exc:
        p.verify(vocab_size=100)
    assert exc.value.param == field
    # verify must also catch it after normalize (negative temperature is not made greedy).
    p.normalize()
    with pytest.raises(InvalidRequestError, match=field):
        p.verify(vocab_size=100)


@pytest.mark.parametrize(
    ("kwargs", "field", "expected"),
    [
        ({"temperature": "hot"}, "temperature", "a number"),
        ({"max_new_tokens": 2.5}, "max_new_tokens", "an integer or null"),
        ({"top_k": True}, "top_k", "an integer"),
        ({"stop": ["a", 1]}, "stop", "a string or a list of strings or null"),
        ({"stop_token_ids": "1"}, "stop_token_ids", "a list of integers or null"),
        ({"ignore_eos": 1}, "ignore_eos", "a boolean"),
        ({"logit_bias": [1.0]}, "logit_bias", "an object or null"),
        ({"regex": 5}, "regex", "a string or null"),
    ],
)
def test_verify_rejects_wrong_types(kwargs: dict[str, Any], field: str, expected: str) -> None:
    """A field of the wrong type (as JSON can send) is a user error naming the type wanted, not a TypeError."""
    with pytest.raises(InvalidRequestError, match=f"{field} must be {expected}, got") as exc:
        SamplingParams(**kwargs).verify(vocab_size=100)
    assert exc.value.param == field


def test_verify_accepts_valid_params() -> None:
    SamplingParams().verify(vocab_size=10)
    SamplingParams(
        temperature=0.0, top_p=1.0, top_k=5, min_p=1.0, frequency_penalty=-2.0,
        presence_penalty=2.0, repetition_penalty=2.0, max_new_tokens=None, min_new_tokens=3,
        logit_bias={"9": -100.0, 0: 100}, stop_token_ids=[9], regex="a",
    ).verify(vocab_size=10)
    # At the limits; stop_token_ids beyond the vocabulary are accepted like SGLang (they can never match).
    SamplingParams(n=128, stop=["x" * 256] * 16, stop_regex=[r"\d{3},", r"(\d{3},)*\.", r"[.!?]\s*$"] + ["a"] * 5,
                   stop_token_ids=[100, 10**9] + [1] * 254, logit_bias={str(i): 1.0 for i in range(1024)},
                   regex="a" * (256 * 1024)).verify(vocab_size=1024)
    # Without a vocab size large token ids cannot be judged and are accepted.
    SamplingParams(logit_bias={"100000": 1.0}, stop_token_ids=[100000]).verify()


def test_from_dict() -> None:
    p = SamplingParams.from_dict({"temperature": 0.5, "top_k": 3})
    assert (p.temperature, p.top_k, p.top_p) == (0.5, 3, 1.0)
    with pytest.raises(InvalidRequestError, match="bogus, topk") as exc:
        SamplingParams.from_dict({"temperature": 0.5, "topk": 3, "bogus": 1})
    assert exc.value.param == "bogus"


def test_normalize() -> None:
    p = SamplingParams(stop="###", temperature=0.0, top_k=7)
    p.normalize()
    assert (p.stop, p.stop_token_ids, p.temperature, p.top_k) == (["###"], [], 1.0, 1)
    q = SamplingParams(temperature=0.7, top_k=-1)
    q.normalize()
    assert (q.stop, q.temperature, q.top_k) == ([], 0.7, -1)


# ---------------------------------------------------------------- randomness


def _mix64_ref(x: int) -> int:
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def test_counter_uniform_matches_unsigned_reference() -> None:
    golden = 0x9E3779B97F4A7C15
    seeds, steps, vocab = [0, 1, -7, (1 << 63) - 1, -(1 << 63)], [0, 5, 3, 1, 1000], 17
    u = counter_uniform(torch.tensor(seeds), torch.tensor(steps), vocab)
    for i, (seed, step) in enumerate(zip(seeds, steps)):
        key = _mix64_ref(((_mix64_ref((seed + golden) & M64)) + (step + 1) * golden) & M64)
        for v in range(vocab):
            bits = _mix64_ref((key + (v + 1) * golden) & M64) >> 12
            assert u[i, v].item() == (bits + 0.5) * 2.0**-52


# ---------------------------------------------------------------- sampler: greedy


def test_greedy_returns_argmax_and_temperature_zero_is_greedy() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    info = make_info([SamplingParams(temperature=0.0) for _ in range(6)], 50)
    assert info.is_all_greedy
    assert torch.equal(Sampler()(logits, info), logits.argmax(dim=-1))


def test_greedy_applies_penalties() -> None:
    logits = torch.tensor([[3.0, 2.0, 0.0, 0.0]])
    info = make_info([SamplingParams(top_k=1, logit_bias={"0": -5.0})], 4)
    assert Sampler()(logits, info).tolist() == [1]


def test_mixed_batch_greedy_rows_stay_argmax() -> None:
    torch.manual_seed(1)
    bs, vocab = 64, 30
    logits = torch.randn(bs, vocab)
    # Even rows greedy; odd rows sample hot, so they almost surely leave the argmax sometimes.
    params = [SamplingParams(top_k=1) if i % 2 == 0 else SamplingParams(temperature=5.0) for i in range(bs)]
    info = make_info(params, vocab)
    assert not info.is_all_greedy and not info.need_top_k
    out = Sampler()(logits, info)
    argmax = logits.argmax(dim=-1)
    assert torch.equal(out[0::2], argmax[0::2])
    assert not torch.equal(out[1::2], argmax[1::2])


# ---------------------------------------------------------------- sampler: filters


def test_top_k_never_leaves_top_k() -> None:
    torch.manual_seed(2)
    n, vocab, k = 2000, 50, 5
    logits = torch.randn(vocab).expand(n, -1).contiguous()
    info = make_info([SamplingParams(top_k=k) for _ in range(n)], vocab, seeds=list(range(n)))
    assert info.need_top_k
    out = Sampler()(logits, info)
    allowed = set(logits[0].topk(k).indices.tolist())
    assert set(out.tolist()) == allowed  # inside the top-k, and every top-k token occurs


def test_top_p_never_leaves_nucleus() -> None:
    # Sorted: t3=.4, t1=.3, t4=.2, .05, .05; mass before each rank: 0, .4, .7, .9, .95,
    # so the nucleus for top_p = 0.8 is exactly {3, 1, 4}.
    probs = [0.05, 0.3, 0.05, 0.4, 0.2]
    n = 2000
    info = make_info([SamplingParams(top_p=0.8) for _ in range(n)], 5, seeds=list(range(n)))
    out = Sampler()(logits_from_probs(probs, n), info)
    assert set(out.tolist()) == {1, 3, 4}


def test_top_p_is_measured_after_top_k() -> None:
    # top-2 = {0.4, 0.3}, renormalized mass before rank 1 is 4/7 >= 0.5 -> only rank 0 left.
    probs = [0.4, 0.3, 0.2, 0.1]
    n = 500
    info = make_info([SamplingParams(top_k=2, top_p=0.5) for _ in range(n)], 4, seeds=list(range(n)))
    assert set(Sampler()(logits_from_probs(probs, n), info).tolist()) == {0}
    info = make_info([SamplingParams(top_k=2, top_p=0.6) for _ in range(n)], 4, seeds=list(range(n)))
    assert set(Sampler()(logits_from_probs(probs, n), info).tolist()) == {0, 1}


def test_min_p_never_emits_unlikely_tokens() -> None:
    # threshold 0.15 * 0.5 = 0.075 keeps tokens 0, 1, 2.
    probs = [0.5, 0.3, 0.1, 0.06, 0.04]
    n = 2000
    info = make_info([SamplingParams(min_p=0.15) for _ in range(n)], 5, seeds=list(range(n)))
    assert info.need_min_p and not info.need_top_p and not info.need_top_k
    assert set(Sampler()(logits_from_probs(probs, n), info).tolist()) == {0, 1, 2}


# ---------------------------------------------------------------- sampler: statistics


def _chi_square(counts: torch.Tensor, probs: list[float], n: int) -> float:
    expected = torch.tensor(probs, dtype=torch.float64) * n
    return float(((counts.double() - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("vary", ["seed", "step"])
def test_empirical_frequencies_match_distribution(vary: str) -> None:
    probs = [0.5, 0.25, 0.125, 0.0625, 0.0625]
    n, temperature = 20000, 0.5
    # softmax(T * log(q) / T) = q, so this also checks that temperature is applied.
    logits = (torch.tensor(probs).log() * temperature).expand(n, -1).contiguous()
    params = [SamplingParams(temperature=temperature) for _ in range(n)]
    if vary == "seed":
        info = make_info(params, 5, seeds=list(range(n)))
    else:
        info = make_info(params, 5, seeds=[123] * n)
        info.steps = torch.arange(n, dtype=torch.int64)
    counts = torch.bincount(Sampler()(logits, info), minlength=5)
    # 4 degrees of freedom: P(chi2 > 18.47) = 0.001.
    assert _chi_square(counts, probs, n) < 18.47
    sigma = torch.tensor([math.sqrt(n * p * (1 - p)) for p in probs])
    assert torch.all((counts - torch.tensor(probs) * n).abs() < 3 * sigma)


# ---------------------------------------------------------------- sampler: reproducibility


def test_same_seed_and_step_reproduce_regardless_of_batch() -> None:
    torch.manual_seed(3)
    vocab = 1000
    target = torch.randn(vocab)
    alone = make_info([SamplingParams(temperature=1.5)], vocab, seeds=[42], output_ids=[[1, 2, 3]])
    token = Sampler()(target.view(1, -1), alone).item()

    others = torch.randn(7, vocab)
    for pos in (0, 3, 7):
        logits = torch.cat([others[:pos], target.view(1, -1), others[pos:]])
        params = [SamplingParams(temperature=0.8, top_p=0.9) for _ in range(8)]
        params[pos] = SamplingParams(temperature=1.5)
        seeds = [1000 + i for i in range(8)]
        seeds[pos] = 42
        outputs = [[5] * i for i in range(8)]
        outputs[pos] = [1, 2, 3]
        info = make_info(params, vocab, seeds=seeds, output_ids=outputs)
        assert Sampler()(logits, info)[pos].item() == token


def test_different_seeds_and_steps_differ() -> None:
    n, vocab = 64, 100
    logits = torch.zeros(n, vocab)  # uniform: collisions would be rare for a working hash
    by_seed = Sampler()(logits, make_info([SamplingParams() for _ in range(n)], vocab, seeds=list(range(n))))
    assert len(set(by_seed.tolist())) > 30
    info = make_info([SamplingParams() for _ in range(n)], vocab, seeds=[7] * n)
    info.steps = torch.arange(n, dtype=torch.int64)
    assert len(set(Sampler()(logits, info).tolist())) > 30


# ---------------------------------------------------------------- penalties


def test_penalties_exact() -> None:
    vocab, eos = 6, 5
    base = torch.tensor([2.0, -1.0, 0.5, -2.0, 1.0, 0.0])
    logits = base.expand(3, -1).contiguous()
    params = [
        SamplingParams(
            repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25,
            logit_bias={"2": 1.5, 0: 2.0}, min_new_tokens=5,
        ),
        SamplingParams(repetition_penalty=2.0, min_new_tokens=2, stop_token_ids=[2]),
        SamplingParams(),
    ]
    info = make_info(
        params, vocab,
        prompt_ids=[[0, 1], [1], [0, 1, 2]],
        output_ids=[[3, 3, 4], [3, 3, 4], [3, 3, 4]],
        eos_token_ids=[eos],
    )
    out = Sampler().apply_penalties(logits, info)
    inf = float("-inf")
    # Row 0: bias first (t0: 2+2=4, t2: 0.5+1.5=2), then repetition on seen {0,1,3,4}
    # (4/2=2, -1*2=-2, -2*2=-4, 1/2=0.5), then t3 -= 0.5*2+0.25, t4 -= 0.5*1+0.25,
    # then EOS banned because 3 generated < 5 minimum.
    row0 = [2.0, -2.0, 2.0, -4.0 - 1.25, 0.5 - 0.75, inf]
    # Row 1: repetition only (row's freq/presence are 0); 3 generated >= 2, nothing banned.
    row1 = [2.0, -2.0, 0.5, -4.0, 0.5, 0.0]
    row2 = base.tolist()
    assert out.tolist() == [row0, row1, row2]
    assert torch.equal(logits, base.expand(3, -1))  # input untouched


def test_min_new_tokens_bans_stop_tokens_until_reached() -> None:
    logits = torch.tensor([[0.0, 0.0, 5.0, 9.0]])
    info = make_info([SamplingParams(top_k=1, min_new_tokens=2, stop_token_ids=[2])], 4,
                     eos_token_ids=[3])
    sampler = Sampler()
    assert sampler(logits, info).item() == 0  # both EOS (3) and the stop id (2) are banned
    info.update(torch.tensor([0]))
    assert sampler(logits, info).item() == 0
    info.update(torch.tensor([0]))
    assert sampler(logits, info).item() == 3


def test_unused_penalty_tables_are_none() -> None:
    info = make_info([SamplingParams(), SamplingParams(temperature=0.5)], 8)
    assert info.logit_bias is None and info.output_counts is None and info.prompt_mask is None
    assert info.frequency_penalties is None and info.presence_penalties is None
    assert info.repetition_penalties is None and info.min_tokens_mask is None
    assert not (info.need_top_k or info.need_top_p or info.need_min_p or info.is_all_greedy)
    logits = torch.randn(2, 8)
    assert Sampler().apply_penalties(logits, info) is logits


# ---------------------------------------------------------------- update


def test_update_increments_counts_and_steps() -> None:
    info = make_info(
        [SamplingParams(frequency_penalty=1.0), SamplingParams()], 5,
        output_ids=[[1, 1, 4], [2]],
    )
    assert info.steps.tolist() == [3, 1]
    assert info.output_counts is not None
    assert info.output_counts.tolist() == [[0, 2, 0, 0, 1], [0, 0, 1, 0, 0]]
    info.update(torch.tensor([4, 2]))
    info.update(torch.tensor([0, 2]))
    assert info.steps.tolist() == [5, 3]
    assert info.output_counts.tolist() == [[1, 2, 0, 0, 2], [0, 0, 3, 0, 0]]
    assert info.output_counts.dtype == torch.int32


def test_the_sampler_takes_its_argmax_from_the_executor() -> None:
    """Greedy rows and the exponential race both go through the injected argmax (the executor's kernel)."""
    seen = []

    def argmax(rows: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(rows.shape))
        return rows.argmax(dim=-1)

    logits = torch.randn(2, 7, generator=torch.Generator().manual_seed(0))
    info = make_info([SamplingParams(temperature=0.0), SamplingParams(temperature=0.8)], 7)
    Sampler(argmax)(logits, info)
    assert seen == [(2, 7), (2, 7)]
