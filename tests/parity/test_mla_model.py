"""DeepSeek-V2 (Multi-head Latent Attention over the MLA latent KV pool) against HF transformers: logits of
batched extend with cached prefixes and of decode steps, greedy continuations, the pool's layout and size, and a
scheduler run (radix cache, chunked prefill, pages) against the static batch.  Extend runs in both forms,
absorbed and decompressed (``extend_path`` forced on every layer), and the automatic choice is checked against
its rule.  DeepSeek's MoE layers are in test_moe_models.py, TP=2 in test_tensor_parallel.py."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from radixlm.core import ForwardMode, Req
from radixlm.executor.static_batch import generate_static
from radixlm.kernels import cpu as cpu_kernels
from radixlm.mem import MLAKVPool
from radixlm.models import mla_extend
from radixlm.models.deepseek_v2 import DeepseekV2Attention
from radixlm.models.mla_extend import MLADims, mla_extend_macs
from radixlm.sampling import SamplingParams
from radixlm.scheduler import run_to_completion

from conftest import (MLA_CONFIGS, build_tiny_hf_model, greedy_req, make_runner, make_scheduler, make_worker,
                      random_seqs)
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



def set_extend_path(worker, path: str) -> None:
    """Force every MLA layer of ``worker``'s model to one extend form (or back to ``auto``)."""
    layers = [m for m in worker.runner.model.modules() if isinstance(m, DeepseekV2Attention)]
    assert layers
    for layer in layers:
        layer.extend_path = path


@pytest.mark.parametrize("backend", ["cpu", "torch_native", "triton"])
@pytest.mark.parametrize("name", sorted(MLA_CONFIGS))
def test_mla_matches_hf(tiny_mla, name, backend):
    """On every backend, absorbed: the Triton kernels (under the interpreter on CPU) read keys wider than values, V
    a view of the latent rows."""
    if backend == "cpu" and not cpu_kernels.available():
        pytest.skip("no C compiler: the CPU kernels are not built")
    path, hf = tiny_mla[name]
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    worker = make_worker(path, attention_backend=backend, dtype="float32", device=device)
    set_extend_path(worker, "absorbed")
    seqs = random_seqs((21, 5, 13, 30))
    check_extend_and_decode(worker, hf, seqs, [9, 0, 12, 20], tol=1e-4)
    outs = generate_static(worker, seqs, SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True))
    for ids, out in zip(seqs, outs):
        assert out == hf_greedy(hf, ids, 12, set())


@pytest.mark.parametrize("name,backend", [("deepseek_v2", "torch_native"), ("deepseek_v2_lora_yarn", "torch_native"),
                                          ("deepseek_v2_lora_yarn", "triton")])
def test_decompressed_extend_matches_hf(tiny_mla, name, backend):
    """The decompressed extend form: requests with and without a cached prefix in one EXTEND batch attend over
    their up-projected prefix and new tokens (the extend kernel over the contiguous layout on Triton, SDPA
    otherwise); the decode steps after it read the latents it stored."""
    path, hf = tiny_mla[name]
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    worker = make_worker(path, attention_backend=backend, dtype="float32", device=device)
    set_extend_path(worker, "decompressed")
    check_extend_and_decode(worker, hf, random_seqs((21, 5, 13, 30)), [9, 0, 12, 20], tol=1e-4)


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


@pytest.mark.parametrize("kwargs,extend_path", [
    (dict(max_total_tokens=2048, chunked_prefill_size=16), "absorbed"),  # radix cache + chunked prefill
    # and paged KV (page gathers of the V view), decompressed
    (dict(max_total_tokens=2048, chunked_prefill_size=16, page_size=4), "decompressed"),
])
def test_scheduler_matches_static(tiny_mla, kwargs, extend_path):
    """Continuous batching over the radix cache gives each request the greedy tokens of the static batch (which
    runs absorbed): with the decompressed form the chunks after the first and the radix-cache hits decompress a
    cached prefix."""
    path, _ = tiny_mla["deepseek_v2_lora_yarn"]
    shared = random_seqs((40,))[0]
    tails = random_seqs((3, 9, 1, 14, 6), seed=2)
    prompts = [shared + t for t in tails] + random_seqs((23, 7), seed=3)
    max_new = [6 + 2 * (i % 3) for i in range(len(prompts))]
    worker = make_worker(path, dtype="float32")
    set_extend_path(worker, "absorbed")
    expected = [generate_static(worker, [p], SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True))[0]
                for p, n in zip(prompts, max_new)]

    def req(i: int) -> Req:
        return greedy_req(str(i), prompts[i], max_new[i])

    sched = make_scheduler(path, dtype="float32", **kwargs)
    set_extend_path(sched.worker, extend_path)
    first = req(0)
    run_to_completion(sched, [first])  # puts the shared prefix in the radix cache
    reqs = [req(i) for i in range(1, len(prompts))]
    run_to_completion(sched, reqs)
    assert [first.output_ids] + [r.output_ids for r in reqs] == expected
    assert all(r.cached_tokens >= 32 for r in reqs[:4])  # the shared prefix came from the cache
    assert sched.is_idle()


def test_extend_path_rule():
    """``auto``: EXTEND batches only, where the modelled saving over the layer's heads reaches
    DECOMPRESSED_MIN_MACS_SAVED (the H200 crossovers); forced paths apply to EXTEND batches only."""
    dims = MLADims(512, 128, 64, 128)  # DeepSeek-V2/V3
    # per pair: 1088 absorbed vs 320 decompressed; per query vs per key: 512 * 256
    assert mla_extend_macs([0], [1], dims) == (1088 + 131072, 320 + 131072)
    assert mla_extend_macs([4096], [64], dims) == (1088 * (64 * 4096 + 2080) + 64 * 131072,
                                                   320 * (64 * 4096 + 2080) + 4160 * 131072)

    def batch(mode: ForwardMode, prefix: list[int], new: list[int], mask=None):
        return type("FB", (), dict(forward_mode=mode, custom_mask=mask, extend_prefix_lens_cpu=prefix,
                                   extend_seq_lens_cpu=new))()

    def rule(fb, path: str, dims: MLADims, heads: int = 16) -> bool:
        return mla_extend.use_decompressed(fb, path, dims, heads)

    # the H200 measurements the threshold was set from (V2-Lite 16 heads, V3 128): absorbed won...
    assert not rule(batch(ForwardMode.EXTEND, [0], [1024]), "auto", dims)
    assert not rule(batch(ForwardMode.EXTEND, [4096], [256]), "auto", dims)
    assert not rule(batch(ForwardMode.EXTEND, [0], [256]), "auto", dims, heads=128)
    # ...decompressed won
    assert rule(batch(ForwardMode.EXTEND, [0], [4096]), "auto", dims)
    assert rule(batch(ForwardMode.EXTEND, [4096], [1024]), "auto", dims)
    assert rule(batch(ForwardMode.EXTEND, [4096], [256]), "auto", dims, heads=128)
    assert rule(batch(ForwardMode.EXTEND, [0, 0], [2048, 2048]), "auto", dims)  # the whole batch counts
    # 128 new tokens after each 8k prefix: decompressing the prefixes costs more than the pairs save
    assert not rule(batch(ForwardMode.EXTEND, [8192, 8192], [128, 128]), "auto", dims, heads=128)
    # fewer heads per rank (tensor parallelism) save less per layer
    assert not rule(batch(ForwardMode.EXTEND, [4096], [1024]), "auto", dims, heads=4)
    for mode in (ForwardMode.MIXED, ForwardMode.TARGET_VERIFY, ForwardMode.DECODE):
        assert not rule(batch(mode, [0], [4096]), "auto", dims)
        assert not rule(batch(mode, [0], [4096]), "decompressed", dims)
    assert rule(batch(ForwardMode.EXTEND, [9], [1]), "decompressed", dims)
    assert not rule(batch(ForwardMode.EXTEND, [0], [4096]), "absorbed", dims)

