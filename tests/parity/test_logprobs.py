"""Prompt and output logprobs from the scheduler equal HF's log-softmax, also when the prompt is cached in the
radix cache (cached tokens must be recomputed) and when the prompt is prefilled in chunks."""

from __future__ import annotations

import pytest
import torch

from radixlm.config import ServerArgs
from radixlm.core import Req
from radixlm.executor import ModelRunner, ModelWorker
from radixlm.models.loader import resolve_model_config
from radixlm.sampling import SamplingParams
from radixlm.sampling.logprobs import LogprobOptions, RequestLogprobs
from radixlm.scheduler import Scheduler, run_to_completion

TOL = 1e-3


def logprob_req(rid: str, ids: list[int], start: int, top: int = 0, token_ids: list[int] | None = None) -> Req:
    req = Req(rid=rid, origin_input_ids=ids, sampling_params=SamplingParams(temperature=0.0, max_new_tokens=6))
    req.sampling_params.normalize()
    options = LogprobOptions(start, top, token_ids)
    req.logprobs = RequestLogprobs(options, input_done=options.input_start(len(ids)) is None)
    return req


@pytest.mark.parametrize("chunk", [-1, 4])
def test_logprobs_match_hf(embedded_path, embedded_tokenizer, embedded_hf_model, chunk):
    args = ServerArgs(model_path=embedded_path, device="cpu", dtype="float32", random_seed=0, max_total_tokens=4096,
                      chunked_prefill_size=chunk)
    sched = Scheduler(args, ModelWorker(ModelRunner(args, resolve_model_config(args))))
    ids = embedded_tokenizer("The quick brown fox jumps over the lazy dog because").input_ids
    # cache the whole prompt first: logprob requests must still get logits for the tokens they score
    run_to_completion(sched, [Req(rid="warm", origin_input_ids=ids,
                                  sampling_params=SamplingParams(temperature=0.0, max_new_tokens=1))])
    from_zero, from_five = logprob_req("a", ids, 0, top=3, token_ids=[5, 17]), logprob_req("b", ids, 5)
    no_input = logprob_req("c", ids, -1)
    run_to_completion(sched, [from_zero, from_five, no_input])
    assert from_five.cached_tokens <= 4 and no_input.cached_tokens == len(ids) - 1

    with torch.no_grad():
        ref = embedded_hf_model(torch.tensor([ids + from_zero.output_ids])).logits[0].log_softmax(-1)
    lp = from_zero.logprobs
    assert lp.input_token_logprobs[0] == (None, ids[0])
    got = torch.tensor([x for x, _ in lp.input_token_logprobs[1:]])
    want = torch.stack([ref[p - 1, ids[p]] for p in range(1, len(ids))])
    assert [t for _, t in lp.input_token_logprobs] == ids
    assert (got - want).abs().max() < TOL
    out_want = torch.stack([ref[len(ids) - 1 + i, t] for i, t in enumerate(from_zero.output_ids)])
    assert [t for _, t in lp.output_token_logprobs] == from_zero.output_ids
    assert (torch.tensor([x for x, _ in lp.output_token_logprobs]) - out_want).abs().max() < TOL
    # top-3: sorted, the greedy token first; requested ids scored at each position
    for i, tops in enumerate(lp.output_top_logprobs):
        assert len(tops) == 3 and tops[0][1] == from_zero.output_ids[i]
        assert tops[0][0] >= tops[1][0] >= tops[2][0]
    for i, by_id in enumerate(lp.output_token_ids_logprobs):
        assert [t for _, t in by_id] == [5, 17]
        assert abs(by_id[1][0] - ref[len(ids) - 1 + i, 17].item()) < TOL

    assert [t for _, t in from_five.logprobs.input_token_logprobs] == ids[5:]
    assert no_input.logprobs.input_token_logprobs == [] and len(no_input.logprobs.output_token_logprobs) == 6
    # the same greedy tokens whichever way the prompt was scored
    assert from_zero.output_ids == from_five.output_ids == no_input.output_ids
