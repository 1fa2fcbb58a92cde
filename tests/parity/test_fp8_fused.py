"""FP8 models with the activation quantization fused into the norms and SiLU-mul (``radixlm.kernels.fused_quant``)
against the same models unfused: bit-identical logits, and the fused path taken where the decoder block asks.

The fusion is CUDA-only (``radixlm.kernels.fused_quant_for``).  On CPU the test forces it by patching that
decision in the layers, and runs both sides with the Triton norm / SiLU-mul kernels (interpreted) so they share
the arithmetic before the quantization; the FP8 linears' CPU path dequantizes what it is fed.  On a GPU the engine's
own decision runs against fusion off, decode in CUDA graphs.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from radixlm.executor.static_batch import decode_batch, extend_batch, release
from radixlm.kernels import fused_ops, fused_quant
from radixlm.kernels.fp8_activation import FP8Activation
from radixlm.layers import activation, fp8_linear, layernorm

from conftest import build_tiny_fp8_model, build_tiny_hf_model, make_worker, random_seqs

CUDA = torch.cuda.is_available()


def force_fusion(monkeypatch: pytest.MonkeyPatch, fuse: bool) -> None:
    """The layers run the Triton norm / SiLU-mul kernels on CPU tensors too (so fused and unfused share their
    arithmetic), and fuse the quantization where ``fuse``."""
    for module in (layernorm, activation):
        monkeypatch.setattr(module, "fused_ops_for", lambda x: fused_ops)
        monkeypatch.setattr(module, "fused_quant_for", lambda x: fused_quant if fuse else None)


def run_logits(worker) -> list[torch.Tensor]:
    """Every logit row of an EXTEND of two prompts and two DECODE steps after it (fixed tokens)."""
    memory = worker.memory
    seqs = random_seqs((21, 9))
    rows = memory.req_to_token_pool.alloc(len(seqs))
    try:
        batch = extend_batch(memory, rows, [0, 0], seqs)
        batch.input_logprob_start = [1, 1]
        logits = [worker.launch(batch).logits.input_token_logits.cpu()]
        seq_lens = [len(s) for s in seqs]
        for step in range(2):
            out = worker.launch(decode_batch(memory, rows, seq_lens, [3 + step, 7 + step]))
            logits.append(out.logits.next_token_logits.cpu())
            seq_lens = [n + 1 for n in seq_lens]
    finally:
        release(worker, rows, [len(s) + 2 for s in seqs])
    return logits


class Counts:
    """Calls of the fused kernels and FP8 linears fed an ``FP8Activation``, through spies on their modules."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.kernels = self.fed = 0
        for name in ("rms_norm_quant_fp8", "silu_and_mul_quant_fp8"):
            monkeypatch.setattr(fused_quant, name, self._counting(getattr(fused_quant, name)))
        forward = fp8_linear.fp8_forward

        def fp8_forward(layer, x):
            self.fed += isinstance(x, FP8Activation)
            return forward(layer, x)

        monkeypatch.setattr(fp8_linear, "fp8_forward", fp8_forward)

    def _counting(self, kernel):
        def counted(*args, **kwargs):
            self.kernels += 1
            return kernel(*args, **kwargs)

        return counted


# 128-wide heads and 128-multiple widths: online FP8's decode takes 128-channel activation groups, and the
# attention's merge writes the o projection's input quantized (its groups fit a head).
WIDE = dict(hidden_size=512, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)


def build(kind: str, name: str, directory: str, overrides: dict | None = None, **kwargs):
    if kind == "online":
        build_tiny_hf_model(name, directory, overrides=overrides)
        return make_worker(directory, quantization="fp8", **kwargs)
    build_tiny_fp8_model(name, directory, block=(32, 32), overrides=overrides)
    return make_worker(directory, **kwargs)


@pytest.mark.skipif(CUDA, reason="Triton kernels on CPU tensors need the interpreter (no GPU)")
@pytest.mark.parametrize("kind,name,fused_per_forward", [
    ("online", "llama", 3 * 2),  # 2 layers: qkv, gate_up, down each fed quantized
    ("block", "llama", 3 * 2),
    ("block", "qwen3_moe", 1 * 3 + 2),  # qkv of 3 layers; gate_up and down of the dense layer; the MoE takes bf16
])
def test_fused_model_gives_the_unfused_logits_on_cpu(tmp_path, monkeypatch, kind, name, fused_per_forward) -> None:
    """The same bf16 worker with the fusion forced (on CPU) and without: identical logits at every step, and the
    fused path taken where the block says (``fused_per_forward`` linears fed an FP8Activation a forward)."""
    worker = build(kind, name, str(tmp_path), dtype="bfloat16")
    with monkeypatch.context() as patch:
        force_fusion(patch, fuse=False)
        unfused = run_logits(worker)
    force_fusion(monkeypatch, fuse=True)
    counts = Counts(monkeypatch)
    fused = run_logits(worker)
    assert counts.fed == 3 * fused_per_forward and counts.kernels == 3 * fused_per_forward
    for got, want in zip(fused, unfused):
        assert torch.equal(got, want)


@pytest.mark.skipif(not CUDA, reason="the fusion is CUDA-only")
@pytest.mark.parametrize("kind", ["online", "block"])
@pytest.mark.parametrize("wide", [False, True], ids=["narrow", "wide"])
def test_fused_model_gives_the_unfused_logits_on_gpu(tmp_path, monkeypatch, kind, wide) -> None:
    """bf16 tiny Llamas on CUDA (decode in CUDA graphs; online FP8's prefill through cuBLAS's row-wise GEMM),
    with the fusion as the engine decides and with it off: bit-identical logits.  Wide: the decode attention
    quantizes the o projection's input too."""
    from radixlm.attention import triton_backend
    from radixlm.kernels import decode_attention

    gpu = dict(device="cuda", dtype="bfloat16", cuda_graph_max_bs=4)
    overrides = WIDE if wide else None
    with monkeypatch.context() as patch:
        for module in (layernorm, activation, triton_backend):
            patch.setattr(module, "fused_quant_for", lambda x: None)
        unfused = run_logits(build(kind, "llama", str(tmp_path / "off"), overrides, **gpu))
    counts = Counts(monkeypatch)
    quantized_merges = []
    decode = decode_attention.decode_attention_fwd

    def spy(*args, **kwargs):
        quantized_merges.append(kwargs.get("o_scale") is not None)
        return decode(*args, **kwargs)

    monkeypatch.setattr(triton_backend, "decode_attention_fwd", spy)
    fused = run_logits(build(kind, "llama", str(tmp_path / "on"), overrides, **gpu))
    assert counts.fed > 0 and counts.kernels > 0
    assert any(quantized_merges) == wide  # (graph capture calls it too: any, not all)
    for got, want in zip(fused, unfused):
        assert torch.equal(got, want)
