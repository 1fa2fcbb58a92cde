"""Regressions for what fuzzing the API found (``tests/fuzz``, ``bench/fuzz.py``), each pinned exactly, in process
(the live-server half is in ``tests/fuzz/test_fuzz_api.py``)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from test_openapi import call
from test_server_errors import StubEngine

from radixlm.sampling.batch_info import SamplingBatchInfo
from radixlm.sampling.sampler import PENALIZED_LOGIT_MAX, Sampler
from radixlm.server.app import create_app
from radixlm.server.streams import json_text, sse


@pytest.mark.parametrize(("path", "body", "message"), [
    # pydantic reads the JSON tokens NaN/Infinity and 1e999 (inf) as floats; temperature=inf passed `>= 0`
    ("/v1/completions", b'{"prompt": "hi", "temperature": Infinity}',
     "temperature: Input should be a finite number; got inf"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "top_p": NaN}',
     "top_p: Input should be a finite number; got nan"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": 1e999}}',
     "logit_bias.5: Input should be a finite number; got inf"),
    # the native sampling_params are a free dict, checked by SamplingParams.verify
    ("/generate", b'{"input_ids": [1], "sampling_params": {"temperature": Infinity}}',
     "temperature must be a finite number, got inf"),
    ("/generate", b'{"input_ids": [1], "sampling_params": {"min_p": NaN}}', "min_p must be a finite number, got nan"),
])
def test_non_finite_numbers_are_400(path: str, body: bytes, message: str) -> None:
    status, out = call(create_app(StubEngine()), "POST", path, body, "application/json")  # type: ignore[arg-type]
    assert status == 400 and out["error"]["message"] == message


def test_a_400_quotes_a_huge_invalid_value_shortened() -> None:
    """The whole 200,000-character value came back in the error message."""
    body = json.dumps({"messages": [{"role": "user", "content": "x"}], "user": 7, "stop": 5, "n": "y" * 200_000})
    status, out = call(create_app(StubEngine()), "POST", "/v1/chat/completions", body.encode())  # type: ignore[arg-type]
    assert status == 400
    assert out["error"]["message"] == (f"n: Input should be a valid integer, unable to parse string as an integer; "
                                       f"got '{'y' * 199}... (200002 characters) (and 3 more problems)")


def test_non_finite_logprobs_are_written_as_strict_json() -> None:
    """A grammar's masked tokens have logprob -inf in a top-k list; Starlette's encoder raised (a 500) and sse()
    wrote -Infinity, which is not JSON."""
    answer = {"top": [[0.0, 5], [float("-inf"), 7]], "nan": float("nan"), "up": float("inf"), "ok": -1.5}
    assert json_text(answer) == '{"top": [[0.0, 5], [-9999.0, 7]], "nan": null, "up": 9999.0, "ok": -1.5}'
    assert json_text({"a": [1, 2]}, separators=(",", ":")) == '{"a":[1,2]}'
    assert sse({"x": float("-inf")}) == 'data: {"x": -9999.0}\n\n'


def test_a_tiny_repetition_penalty_keeps_logits_finite() -> None:
    """repetition_penalty 5e-324 (valid: in (0, 2]) is 0 in float32: seen positive logits became inf, then NaN
    probabilities, and a sampled token a grammar could not accept aborted the request."""
    logits = torch.tensor([[2.0, -3.0, 1.0, float("-inf")]])
    info = SamplingBatchInfo.__new__(SamplingBatchInfo)
    for name in ("logit_bias", "frequency_penalties", "presence_penalties", "min_tokens_mask"):
        setattr(info, name, None)
    info.repetition_penalties = torch.tensor([5e-324], dtype=torch.float32)
    info.prompt_mask = torch.tensor([[True, True, False, True]])
    info.output_counts = torch.zeros(1, 4, dtype=torch.int32)
    out = Sampler.apply_penalties(Sampler.__new__(Sampler), logits, info)
    assert out[0, 0] == PENALIZED_LOGIT_MAX and out[0, 2] == 1.0 and out[0, 3] == float("-inf")
    assert -1e-30 < out[0, 1] <= 0
    assert not torch.isnan(torch.softmax(out / 1e-6, dim=-1)).any()


def test_a_tiny_top_p_keeps_the_top_token() -> None:
    """top_p 5e-324 (valid: in (0, 1]) is 0 in float32: the top-p budget was 0, no token survived the filter, the
    sampler picked an arbitrary one and a grammar request aborted."""
    probs = torch.tensor([[0.1, 0.6, 0.3]])
    info = SimpleNamespace(need_top_k=False, need_top_p=True, need_min_p=False, vocab_size=3,
                           top_ps=torch.tensor([5e-324], dtype=torch.float32))
    assert Sampler._filter(probs, info).tolist() == [[0.0, pytest.approx(0.6), 0.0]]
