"""Grammar-constrained requests through the scheduler: outputs identical with chunked prefill and under memory
pressure (retraction keeps the matcher in step with the output), logprobs and stop strings still work, and the
constraint holds."""

from __future__ import annotations

import json
import re

import pytest

from radixlm.config import ServerArgs
from radixlm.core import Req
from radixlm.executor import ModelRunner, ModelWorker
from radixlm.models.loader import resolve_model_config
from radixlm.sampling import SamplingParams
from radixlm.sampling.logprobs import LogprobOptions, RequestLogprobs
from radixlm.scheduler import Scheduler, run_to_completion

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
          "age": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["name", "age"],
          "additionalProperties": False}
DATE = r"(19|20)\d{2}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"


def make_reqs(tokenizer) -> list[Req]:
    specs = [("A person as JSON: ", dict(json_schema=json.dumps(SCHEMA))),
             ("Today's date is ", dict(regex=DATE)),
             ("The quick brown fox", dict(ignore_eos=True)),
             ("Another person in JSON format: ", dict(json_schema=json.dumps(SCHEMA), temperature=1.0, seed=7)),
             ("Roses are red,", dict(ignore_eos=True))]
    reqs = []
    for i, (text, extra) in enumerate(specs):
        sp = SamplingParams(**{"temperature": 0.0, "max_new_tokens": 40, **extra})
        sp.normalize()
        reqs.append(Req(rid=str(i), origin_input_ids=tokenizer(text).input_ids, sampling_params=sp,
                        seed=sp.seed or i))
    return reqs


def run(path: str, tokenizer, **kwargs) -> tuple[list[Req], Scheduler]:
    args = ServerArgs(model_path=path, device="cpu", dtype="float32", random_seed=0, **kwargs)
    sched = Scheduler(args, ModelWorker(ModelRunner(args, resolve_model_config(args))))
    reqs = make_reqs(tokenizer)
    run_to_completion(sched, reqs)
    return reqs, sched


@pytest.fixture(scope="module")
def reference(embedded_path, embedded_tokenizer):
    reqs, _ = run(embedded_path, embedded_tokenizer, max_total_tokens=8192, chunked_prefill_size=-1)
    return reqs


def test_constraints_hold(reference, embedded_tokenizer):
    for i in (0, 3):
        value = json.loads(embedded_tokenizer.decode(reference[i].output_ids, skip_special_tokens=True))
        assert set(value) == {"name", "age"} and 0 <= value["age"] <= 99
        assert reference[i].finished_reason["type"] == "stop"
    assert re.fullmatch(DATE, embedded_tokenizer.decode(reference[1].output_ids, skip_special_tokens=True))


@pytest.mark.parametrize("kwargs", [
    dict(max_total_tokens=8192, disable_overlap_schedule=True),  # the reference runs overlapped
    dict(max_total_tokens=8192, chunked_prefill_size=4),
    dict(max_total_tokens=64, chunked_prefill_size=8, schedule_conservativeness=0.3),
])
def test_outputs_identical_chunked_and_retracted(reference, embedded_path, embedded_tokenizer, kwargs):
    reqs, sched = run(embedded_path, embedded_tokenizer, **kwargs)
    if kwargs["max_total_tokens"] < 100:
        assert sched.decode.num_retracted > 0, "the small pool should force a retraction"
    assert [r.output_ids for r in reqs] == [r.output_ids for r in reference]
    assert [r.finished_reason for r in reqs] == [r.finished_reason for r in reference]


def test_logprobs_with_a_grammar(embedded_path, embedded_tokenizer):
    """Logprobs of a constrained request are those of the distribution it was sampled from (the grammar mask
    applied): one finite entry per output token, naming that token, and top alternatives the grammar allows."""
    args = ServerArgs(model_path=embedded_path, device="cpu", dtype="float32", random_seed=0, max_total_tokens=4096)
    sched = Scheduler(args, ModelWorker(ModelRunner(args, resolve_model_config(args))))
    sp = SamplingParams(temperature=0.0, max_new_tokens=40, regex=DATE)
    sp.normalize()
    req = Req(rid="lp", origin_input_ids=embedded_tokenizer("Today's date is ").input_ids, sampling_params=sp)
    req.logprobs = RequestLogprobs(LogprobOptions(-1, 3))
    req.logprobs.input_done = True
    run_to_completion(sched, [req])
    out = req.logprobs.drain()
    tokens, tops = out["output_token_logprobs"], out["output_top_logprobs"]
    assert [t[1] for t in tokens] == req.output_ids
    assert all(t[0] > float("-inf") for t in tokens)
    first_allowed = {str(d) for d in range(10)}  # the date starts with 19 or 20: a digit
    assert all(embedded_tokenizer.decode([tid]).strip()[:1] in first_allowed for lp, tid in tops[0]
               if lp > float("-inf"))
