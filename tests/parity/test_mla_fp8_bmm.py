"""``--enable-fp8-mla-bmm``: DeepSeek's absorbed products with W_UK and W_UV in FP8 (``radixlm.kernels.fp8_bmm``)
against the same model without it, over batched extend with cached prefixes (the absorbed extend form) and decode
steps.

- With the roundings undone (the activations passed through, the buffers holding the unquantized weights with
  scale 1) the FP8 path equals the unquantized one to fp32 noise: the heads, transposes and scales are wired right.
- With them, the logits move by the quantization error: each product rounds both operands to E4M3 (<= 2^-4
  relative per element, ~3-4 % of a product's norm each for random data).  On these 64-wide two-layer models the
  logits move by 5.8 % of their norm (the q-LoRA model; bounded at 12 %), 9.1 % for the block-FP8 checkpoint
  without q LoRA (bounded at 15 %), 15.6 % for the MoE model (V3 routing: a moved logit can flip an expert
  choice; bounded at 25 %).
- The decompressed extend form does not read the FP8 weights: its logits are bit-identical with the flag.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from radixlm.config import ModelConfig, ServerArgs
from radixlm.executor.static_batch import decode_batch, extend_batch, generate_static, release
from radixlm.kernels import fp8_bmm
from radixlm.kernels.fp8 import FP8_DTYPE, FP8_MAX, dequantize_block_fp8
from radixlm.models.deepseek_v2 import DeepseekV2Attention
from radixlm.sampling import SamplingParams

from conftest import TINY_CONFIGS, build_tiny_fp8_model, build_tiny_hf_model, make_worker, random_seqs

SEQS = random_seqs((21, 5, 13, 30))
PREFIXES = [9, 0, 12, 20]
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """name -> checkpoint path: the dense q-LoRA MLA model, the V3 MoE one, and a block-FP8 (16x16) dense one."""
    paths = {}
    for name in ("deepseek_v2_lora_yarn", "deepseek_v3"):
        paths[name] = str(tmp_path_factory.mktemp(name))
        build_tiny_hf_model(name, paths[name])
    paths["fp8"] = str(tmp_path_factory.mktemp("fp8"))
    build_tiny_fp8_model("deepseek_v2", paths["fp8"], block=(16, 16))
    return paths


def mla_layers(worker) -> list[DeepseekV2Attention]:
    return [m for m in worker.runner.model.modules() if isinstance(m, DeepseekV2Attention)]


def extend_decode_logits(worker, steps: int = 3) -> torch.Tensor:  # [rows, vocab] float32 on the host
    """Each sequence's prefix prefilled, then one batched EXTEND of the rest, then ``steps`` DECODE steps of
    fixed tokens: the logits of every new token and of every decode step."""
    memory = worker.memory
    rows = memory.req_to_token_pool.alloc(len(SEQS))
    cached = [i for i, p in enumerate(PREFIXES) if p > 0]
    out = []
    try:
        worker.launch(extend_batch(memory, [rows[i] for i in cached], [0] * len(cached),
                                   [SEQS[i][: PREFIXES[i]] for i in cached]))
        batch = extend_batch(memory, rows, PREFIXES, [s[p:] for s, p in zip(SEQS, PREFIXES)])
        batch.input_logprob_start = [p + 1 for p in PREFIXES]
        out.append(worker.launch(batch).logits.input_token_logits.float().cpu())
        seq_lens = [len(s) for s in SEQS]
        for step in range(steps):
            tokens = [(17 * i + 5 * step + 3) % 1000 for i in range(len(SEQS))]
            out.append(worker.launch(decode_batch(memory, rows, seq_lens, tokens)).logits.next_token_logits
                       .float().cpu())
            seq_lens = [n + 1 for n in seq_lens]
    finally:
        release(worker, rows, [len(s) + steps for s in SEQS])
    return torch.cat(out)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_fp8_bmm_close_to_unquantized(tiny_models, device):
    """CPU: the torch path; CUDA: the Triton kernel, decode in CUDA graphs."""
    path = tiny_models["deepseek_v2_lora_yarn"]
    off = make_worker(path, device=device)
    on = make_worker(path, device=device, enable_fp8_mla_bmm=True)
    for layer in mla_layers(on):
        assert layer.fp8_bmm and layer.w_uk_fp8.dtype == FP8_DTYPE and layer.w_uv_fp8.dtype == FP8_DTYPE
        assert layer.w_uk_fp8.shape == (4, 32, 16) and layer.w_uv_scale.shape == (4,)  # [heads, rank, nope]
    assert not any(layer.fp8_bmm for layer in mla_layers(off))
    ref, got = extend_decode_logits(off), extend_decode_logits(on)
    assert not torch.equal(ref, got)  # the path changed
    assert rel(got, ref) < 0.12
    params = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
    assert generate_static(on, SEQS, params) == generate_static(off, SEQS, params)


def test_fp8_bmm_moe_model(tiny_models):
    """DeepSeek-V3 (MoE layers after a dense one): the flag applies to every layer's attention."""
    path = tiny_models["deepseek_v3"]
    on = make_worker(path, enable_fp8_mla_bmm=True)
    assert len(mla_layers(on)) == 3 and all(layer.fp8_bmm for layer in mla_layers(on))
    assert rel(extend_decode_logits(on), extend_decode_logits(make_worker(path))) < 0.25


def test_fp8_path_wiring_is_exact(tiny_models, monkeypatch):
    """Roundings undone, the FP8 path computes what the unquantized absorbed products compute."""
    path = tiny_models["deepseek_v2_lora_yarn"]
    on = make_worker(path, enable_fp8_mla_bmm=True)
    monkeypatch.setattr(fp8_bmm, "round_activation", lambda x: x.float())
    for layer in mla_layers(on):
        w_uk, w_uv = layer.absorbed_weights()
        layer.w_uk_fp8, layer.w_uv_fp8 = w_uk.transpose(1, 2).contiguous(), w_uv.contiguous()
        layer.w_uk_scale, layer.w_uv_scale = torch.ones(4), torch.ones(4)
    assert rel(extend_decode_logits(on), extend_decode_logits(make_worker(path))) < 1e-5


def test_decompressed_extend_unaffected(tiny_models):
    path = tiny_models["deepseek_v2_lora_yarn"]
    workers = [make_worker(path), make_worker(path, enable_fp8_mla_bmm=True)]
    outs = []
    for worker in workers:
        for layer in mla_layers(worker):
            layer.extend_path = "decompressed"
        memory = worker.memory
        rows = memory.req_to_token_pool.alloc(len(SEQS))
        batch = extend_batch(memory, rows, [0] * len(SEQS), SEQS)
        batch.input_logprob_start = [1] * len(SEQS)
        outs.append(worker.launch(batch).logits.input_token_logits.clone())
        release(worker, rows, [len(s) for s in SEQS])
    assert torch.equal(outs[0], outs[1])


def test_block_fp8_checkpoint(tiny_models):
    """kv_b_proj stored block-FP8: the per-head weights are requantized from its dequantized values (each within
    E4M3's rounding of them), and the logits stay within 15 % of the unquantized-products model's."""
    path = tiny_models["fp8"]
    on = make_worker(path, enable_fp8_mla_bmm=True)
    for layer in mla_layers(on):
        kv_b = layer.kv_b_proj
        assert kv_b.weight.dtype == FP8_DTYPE
        w_uk, w_uv = layer._split_kv_b(dequantize_block_fp8(kv_b.weight, kv_b.weight_scale_inv, (16, 16)))
        for w, w_q, s in ((w_uk.transpose(1, 2), layer.w_uk_fp8, layer.w_uk_scale),
                          (w_uv, layer.w_uv_fp8, layer.w_uv_scale)):
            assert torch.equal(s, w.abs().amax(dim=(1, 2)) / FP8_MAX)
            bound = torch.maximum(w.abs() * 2.0**-4, s[:, None, None] * 2.0**-10) * (1 + 1e-6)
            assert ((w_q.float() * s[:, None, None] - w).abs() <= bound).all()
    assert rel(extend_decode_logits(on), extend_decode_logits(make_worker(path))) < 0.15


def test_flag_needs_an_mla_model(tmp_path):
    parser = __import__("argparse").ArgumentParser()
    ServerArgs.add_cli_args(parser)
    assert ServerArgs.from_cli_args(parser.parse_args(["--enable-fp8-mla-bmm"])).enable_fp8_mla_bmm
    assert not ServerArgs().enable_fp8_mla_bmm
    spec = dict(TINY_CONFIGS["llama"])
    hf = dict(spec, architectures=[spec.pop("arch")])
    with pytest.raises(ValueError, match="MLA models"):
        ModelConfig.from_hf(str(tmp_path), hf_config=hf, enable_fp8_mla_bmm=True)
