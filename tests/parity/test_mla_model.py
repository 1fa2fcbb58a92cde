"""DeepSeek-V2 (Multi-head Latent Attention, absorbed form, over the MLA latent KV pool) against HF transformers:
logits of batched extend with cached prefixes and of decode steps, greedy continuations, the pool's layout and
size, and a scheduler run (radix cache, chunked prefill, pages) against the static batch.  DeepSeek's MoE layers are
in test_moe_models.py, TP=2 in test_tensor_parallel.py."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from radixlm.core import Req
from radixlm.executor.static_batch import generate_static
from radixlm.kernels import cpu as cpu_kernels
from radixlm.mem import MLAKVPool
from radixlm.sampling import SamplingParams
from radixlm.scheduler import run_to_completion

from conftest import MLA_CONFIGS, build_tiny_hf_model, make_runner, make_scheduler, make_worker
from hf_reference import check_extend_and_decode, hf_greedy


@pytest.fixture(scope="module")
def tiny_mla(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, torch.nn.Module]]:
    """Each MLA config saved once: name -> (path, HF model).  Biases (zero at HF's init) are made random, so
    that their loading is checked too."""
    models = {}
    for name in MLA_CONFIGS:
        path = str(tmp_path_factory.mktemp(name))
        hf = build_tiny_hf_model(name, path)
        with torch.no_grad():
            for param_name, p in hf.named_parameters():
                if param_name.endswith(".bias"):
                    p.normal_(0.0, 0.1)
        hf.save_pretrained(path)
        models[name] = (path, hf)
    return models


def random_seqs(lengths: tuple[int, ...], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 1000, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("backend", ["cpu", "torch_native", "triton"])
@pytest.mark.parametrize("name", sorted(MLA_CONFIGS))
def test_mla_matches_hf(tiny_mla, name, backend):
    """On every backend: the Triton kernels (under the interpreter on CPU) read keys wider than values, V a view
    of the latent rows."""
    if backend == "cpu" and not cpu_kernels.available():
        pytest.skip("no C compiler: the CPU kernels are not built")
    path, hf = tiny_mla[name]
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    worker = make_worker(path, attention_backend=backend, dtype="float32", device=device)
    seqs = random_seqs((21, 5, 13, 30))
    check_extend_and_decode(worker, hf, seqs, [9, 0, 12, 20], tol=1e-4)
    outs = generate_static(worker, seqs, SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True))
    for ids, out in zip(seqs, outs):
        assert out == hf_greedy(hf, ids, 12, set())


def test_mla_pool(tiny_mla):
    """One latent + rope vector per token and layer, stored once (V is a view of it)."""
    runner = make_runner(tiny_mla["deepseek_v2"][0], dtype="float32", max_total_tokens=256)
    cfg = MLA_CONFIGS["deepseek_v2"]
    assert isinstance(runner.kv_pool, MLAKVPool)
    assert runner.kv_spec.layout == "mla"
    per_token = cfg["num_hidden_layers"] * (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]) * 4
    assert runner.kv_spec.bytes_per_token() == per_token
    assert runner.kv_pool.bytes() == (256 + runner.kv_pool.page_size) * per_token
    k, v = runner.kv_pool.get_kv_buffer(0)
    assert v.shape[-1] == cfg["kv_lora_rank"] and v.data_ptr() == k.data_ptr()


@pytest.mark.parametrize("kwargs", [
    dict(max_total_tokens=2048, chunked_prefill_size=16),  # radix cache + chunked prefill
    dict(max_total_tokens=2048, chunked_prefill_size=16, page_size=4),  # and paged KV (page gathers of the V view)
])
def test_scheduler_matches_static(tiny_mla, kwargs):
    """Continuous batching over the radix cache gives each request the greedy tokens of the static batch."""
    path, _ = tiny_mla["deepseek_v2_lora_yarn"]
    shared = random_seqs((40,))[0]
    tails = random_seqs((3, 9, 1, 14, 6), seed=2)
    prompts = [shared + t for t in tails] + random_seqs((23, 7), seed=3)
    max_new = [6 + 2 * (i % 3) for i in range(len(prompts))]
    worker = make_worker(path, dtype="float32")
    expected = [generate_static(worker, [p], SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True))[0]
                for p, n in zip(prompts, max_new)]

    def req(i: int) -> Req:
        sp = SamplingParams(temperature=0.0, max_new_tokens=max_new[i], ignore_eos=True)
        sp.normalize()
        return Req(rid=str(i), origin_input_ids=list(prompts[i]), sampling_params=sp)

    sched = make_scheduler(path, dtype="float32", **kwargs)
    first = req(0)
    run_to_completion(sched, [first])  # puts the shared prefix in the radix cache
    reqs = [req(i) for i in range(1, len(prompts))]
    run_to_completion(sched, reqs)
    assert [first.output_ids] + [r.output_ids for r in reqs] == expected
    assert all(r.cached_tokens >= 32 for r in reqs[:4])  # the shared prefix came from the cache
    assert sched.is_idle()

