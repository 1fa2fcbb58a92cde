"""Mixture-of-experts models against HF transformers, one tiny config per routing family (DeepSeek-V2 group-limited
greedy with shared experts, DeepSeek-V3 sigmoid + correction bias, Qwen3-MoE, Mixtral): logits of batched extend
over cached prefixes and of decode steps, greedy continuations, a scheduler run over the radix cache with chunked
prefill and pages, and prompt/output logprobs.  TP=2 is in test_tensor_parallel.py."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from radixlm.core import Req
from radixlm.executor.static_batch import generate_static
from radixlm.layers.moe import SparseMoeBlock
from radixlm.sampling import SamplingParams
from radixlm.sampling.logprobs import LogprobOptions, RequestLogprobs
from radixlm.scheduler import run_to_completion

from conftest import MOE_CONFIGS, build_tiny_hf_model, greedy_req, make_scheduler, make_worker, random_seqs
from hf_reference import check_extend_and_decode, hf_greedy


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, torch.nn.Module]]:
    """Each MoE config saved once: name -> (path, HF model)."""
    models = {}
    for name in MOE_CONFIGS:
        path = str(tmp_path_factory.mktemp(name))
        models[name] = (path, build_tiny_hf_model(name, path))
    return models



@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the Triton MoE and routing kernels on CUDA need a GPU"))])
@pytest.mark.parametrize("name", sorted(MOE_CONFIGS))
def test_moe_matches_hf(tiny_moe, name, device):
    """On CPU the grouped torch experts; on CUDA the Triton fused-MoE kernel (and V3's routing kernel) in CUDA
    graphs for the decode steps."""
    path, hf = tiny_moe[name]
    worker = make_worker(path, dtype="float32", device=device)
    layers = worker.runner.model.model.layers
    moe = [i for i, layer in enumerate(layers) if isinstance(layer.mlp, SparseMoeBlock)]
    assert moe == {"deepseek_v2_moe": [1, 2], "deepseek_v3": [1, 2], "qwen3_moe": [0, 2], "mixtral": [0, 1]}[name]
    seqs = random_seqs((21, 5, 13, 30))
    check_extend_and_decode(worker, hf, seqs, [9, 0, 12, 20], tol=1e-4)
    outs = generate_static(worker, seqs, SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True))
    for ids, out in zip(seqs, outs):
        assert out == hf_greedy(hf, ids, 10, set())


PAGED_CHUNKED = dict(max_total_tokens=2048, chunked_prefill_size=16, page_size=4)
PRESSURE = dict(max_total_tokens=128, chunked_prefill_size=32, schedule_conservativeness=0.3)  # evict + retract


@pytest.mark.parametrize("name,kwargs", [("deepseek_v3", PAGED_CHUNKED), ("qwen3_moe", PAGED_CHUNKED),
                                         ("deepseek_v3", PRESSURE)])
def test_moe_scheduler_matches_static(tiny_moe, name, kwargs):
    """Continuous batching (overlapped) over the radix cache, chunked prefill and 4-token pages, or under memory
    pressure that evicts and retracts, gives each request the greedy tokens of the static batch (routing is per
    token, so batching must not change it)."""
    path, _ = tiny_moe[name]
    shared = random_seqs((40,))[0]
    prompts = [shared + t for t in random_seqs((3, 9, 1, 14), seed=2)] + random_seqs((23, 7), seed=3)
    max_new = [(5 if kwargs is PAGED_CHUNKED else 24) + 2 * (i % 3) for i in range(len(prompts))]
    worker = make_worker(path, dtype="float32")
    expected = [generate_static(worker, [p], SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True))[0]
                for p, n in zip(prompts, max_new)]

    def req(i: int) -> Req:
        return greedy_req(str(i), prompts[i], max_new[i])

    sched = make_scheduler(path, **kwargs)
    first = req(0)
    run_to_completion(sched, [first])
    reqs = [req(i) for i in range(1, len(prompts))]
    run_to_completion(sched, reqs)
    assert [first.output_ids] + [r.output_ids for r in reqs] == expected
    assert sched.is_idle()
    if kwargs is PRESSURE:
        assert sched.decode.num_retracted > 0
    else:
        assert all(r.cached_tokens >= 32 for r in reqs[:3])


@pytest.mark.parametrize("name", ["deepseek_v2_moe", "mixtral"])
def test_moe_logprobs_match_hf(tiny_moe, name):
    """Prompt logprobs of a chunked prefill and output logprobs equal HF's log-softmax."""
    path, hf = tiny_moe[name]
    ids = random_seqs((19,), seed=4)[0]
    req = greedy_req("lp", ids, 5)
    req.logprobs = RequestLogprobs(LogprobOptions(0, 0, None), input_done=False)
    run_to_completion(make_scheduler(path, max_total_tokens=1024, chunked_prefill_size=8), [req])
    with torch.no_grad():
        ref = hf(torch.tensor([ids + req.output_ids])).logits[0].log_softmax(-1)
    got_in = torch.tensor([x for x, _ in req.logprobs.input_token_logprobs[1:]])
    want_in = torch.stack([ref[p - 1, ids[p]] for p in range(1, len(ids))])
    assert (got_in - want_in).abs().max() < 1e-4
    got_out = torch.tensor([x for x, _ in req.logprobs.output_token_logprobs])
    want_out = torch.stack([ref[len(ids) - 1 + i, t] for i, t in enumerate(req.output_ids)])
    assert (got_out - want_out).abs().max() < 1e-4
    assert req.output_ids == hf_greedy(hf, ids, 5, set())


def test_layer_override_cuts_the_checkpoint(tiny_moe):
    """--json-model-override-args '{"num_hidden_layers": 2}' builds the first two layers and skips the checkpoint's
    third (as a DeepSeek-V3 checkpoint's multi-token-prediction layer is skipped); what is loaded is HF's."""
    path, hf = tiny_moe["deepseek_v3"]
    worker = make_worker(path, json_model_override_args='{"num_hidden_layers": 2}')
    model = worker.runner.model
    assert len(model.model.layers) == 2
    experts = model.model.layers[1].mlp.experts
    for e in (0, 7):
        ref = hf.model.layers[1].mlp.experts  # transformers 5 stacks experts as we do: [E, 2 * inter, hidden]
        assert torch.equal(experts.gate_up_proj[e], ref.gate_up_proj[e])
        assert torch.equal(experts.down_proj[e], ref.down_proj[e])
    assert torch.equal(model.model.layers[1].mlp.gate.e_score_correction_bias,
                       hf.model.layers[1].mlp.gate.e_score_correction_bias)


def test_presets_build_with_published_sizes():
    """The dummy presets' parameter counts are the published ones; DeepSeek-V3 cut to 5 layers (3 dense, 2 MoE)."""
    from radixlm.config import ServerArgs
    from radixlm.models.loader import resolve_model_config
    from radixlm.models.registry import get_model_class

    def billions(name: str, override: str = "") -> tuple[float, list[int]]:
        args = ServerArgs(model_path=name, load_format="dummy", device="cpu", dtype="bfloat16",
                          json_model_override_args=override)
        cfg = resolve_model_config(args)
        with torch.device("meta"):
            model = get_model_class(cfg.architecture)(cfg)
        moe = [i for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, SparseMoeBlock)]
        return round(sum(p.numel() for p in model.parameters()) / 1e9, 1), moe

    assert billions("deepseek-v2-lite")[0] == 15.7
    assert billions("qwen3-30b-a3b")[0] == 30.5
    assert billions("mixtral-8x7b")[0] == 46.7
    assert billions("deepseek-v3", '{"num_hidden_layers": 5}')[1] == [3, 4]
