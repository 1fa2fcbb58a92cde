"""CUDA-graph decode: the captured batch sizes, and (on a GPU) replayed steps equal to eager ones."""

from __future__ import annotations

import pytest
import torch

from radixlm.executor.cuda_graph_runner import capture_batch_sizes
from radixlm.sampling import SamplingParams
from conftest import build_tiny_hf_model


def test_capture_batch_sizes() -> None:
    assert capture_batch_sizes(1) == [1]
    assert capture_batch_sizes(6) == [1, 2, 4, 6]
    assert capture_batch_sizes(8) == [1, 2, 4, 8]
    assert capture_batch_sizes(30) == [1, 2, 4, 8, 16, 24, 30]
    assert capture_batch_sizes(256)[-3:] == [240, 248, 256] and len(capture_batch_sizes(256)) == 35


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("page_size", [1, 16])
def test_graph_decode_matches_eager(tmp_path, page_size: int) -> None:
    """Greedy tokens are identical with CUDA graphs and without, while the decode batch shrinks as requests of
    different lengths finish (every step padded to a captured size)."""
    from radixlm.config import ServerArgs
    from radixlm.core import Req
    from radixlm.executor import ModelRunner, ModelWorker
    from radixlm.models.loader import resolve_model_config
    from radixlm.scheduler import Scheduler, run_to_completion

    build_tiny_hf_model("llama", str(tmp_path))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (5, 17, 33, 3, 9, 60, 2, 11, 40, 7, 21)]
    outs = {}
    for disable in (False, True):
        args = ServerArgs(model_path=str(tmp_path), device="cuda", dtype="bfloat16", max_total_tokens=8192,
                          page_size=page_size, random_seed=0, cuda_graph_max_bs=16, disable_cuda_graph=disable)
        runner = ModelRunner(args, resolve_model_config(args))
        assert (runner.cuda_graph_runner is None) == disable
        reqs = [Req(rid=str(i), origin_input_ids=p, sampling_params=SamplingParams(
                    temperature=0, max_new_tokens=4 + 3 * i, ignore_eos=True)) for i, p in enumerate(prompts)]
        for r in reqs:
            r.sampling_params.normalize()
        run_to_completion(Scheduler(args, ModelWorker(runner)), reqs)
        outs[disable] = [r.output_ids for r in reqs]
    assert outs[False] == outs[True]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU scheduler path needs a GPU")
def test_gpu_schedules_agree(tmp_path) -> None:
    """On the GPU, in float32: the overlap schedule, mixed chunks, paged KV, eager decode and logprob requests
    change no greedy token (every step launched without reading device values on the host)."""
    from radixlm.core import Req
    from radixlm.sampling.logprobs import LogprobOptions, RequestLogprobs

    from conftest import make_scheduler
    from radixlm.scheduler import run_to_completion

    build_tiny_hf_model("llama", str(tmp_path))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (5, 70, 33, 3, 9, 120, 2, 11)]
    outs = {}
    for name, flags in {"default": {}, "no_overlap": dict(disable_overlap_schedule=True),
                        "mixed": dict(enable_mixed_chunk=True, chunked_prefill_size=32),
                        "paged": dict(page_size=16), "eager": dict(disable_cuda_graph=True)}.items():
        sched = make_scheduler(str(tmp_path), device="cuda", max_total_tokens=8192, cuda_graph_max_bs=8, **flags)
        reqs = [Req(rid=str(i), origin_input_ids=p, sampling_params=SamplingParams(
                    temperature=0, max_new_tokens=6 + 3 * i, ignore_eos=True)) for i, p in enumerate(prompts)]
        reqs[1].logprobs = RequestLogprobs(LogprobOptions(-1, 2), input_done=True)  # output logprobs only
        for r in reqs:
            r.sampling_params.normalize()
        run_to_completion(sched, reqs)
        outs[name] = [r.output_ids for r in reqs]
        assert len(reqs[1].logprobs.output_token_logprobs) == len(reqs[1].output_ids)
        assert [e[1] for e in reqs[1].logprobs.output_token_logprobs] == reqs[1].output_ids
    assert all(o == outs["default"] for o in outs.values()), outs
