"""``radixlm.kernels.fused_quant``: RMSNorm and SiLU-mul that quantize their output for the next FP8 linear, and
the plumbing that hands the linear an ``FP8Activation``.

The fused kernels must give the bits of the composition they replace, ``fused_ops``' kernel then the Triton
quantizer (``fp8_activation.quantize_activation``), so they are compared bit for bit with it.  Without CUDA both
run under the Triton interpreter, whose fp32 -> bf16 cast truncates: the same in both, so bf16 is compared too
(against the interpreted composition, not torch).  ``tests/parity/test_fp8_fused.py`` checks whole models.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported: decoration picks the mode

import pytest  # noqa: E402

from radixlm.kernels import fused_ops, fused_quant, fused_quant_for  # noqa: E402
from radixlm.kernels.fp8 import round_activations  # noqa: E402
from radixlm.kernels.fp8_activation import ActivationQuant, FP8Activation, quantize_activation  # noqa: E402
from radixlm.layers import activation, layernorm  # noqa: E402
from radixlm.layers.activation import SiluAndMul  # noqa: E402
from radixlm.layers.layernorm import RMSNorm  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
PER_TOKEN = ActivationQuant(None)


def randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype).to(DEVICE)


def assert_same(got: FP8Activation, want: FP8Activation) -> None:
    assert got.q.dtype == want.q.dtype == torch.float8_e4m3fn
    assert torch.equal(got.q.view(torch.uint8), want.q.view(torch.uint8)), "quantized bits differ"
    assert torch.equal(got.scale, want.scale), "scales differ"
    assert (got.dtype, got.shape) == (want.dtype, want.shape)


# (rows, K, group): K = 288 (96 * 3) is not a power of two; 2304 spans three 1024-wide per-token chunks; group 96
# is not a power of two either.
NORM_CASES = [(1, 288, None), (5, 288, 32), (3, 256, 128), (2, 2304, None), (4, 2304, 128), (2, 288, 96)]


# Columns a program quantizes (``fused_quant._CHUNK``): the served value, and the fewest programs a row for every
# case (one a row per group; per token two, ``fused_quant._split`` says why).
CHUNKS = [1024, 1 << 14]


@pytest.mark.parametrize("rows,k,group", NORM_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_rms_norm_quant_is_norm_then_quantizer(rows, k, group, dtype, with_residual, chunk, poisoned_outputs,
                                               monkeypatch) -> None:
    monkeypatch.setattr(fused_quant, "_CHUNK", chunk)
    x = randn(rows, k, dtype=dtype, seed=k + rows, scale=3.0)
    x[0, :32] = 0  # an all-zero group: the scale floor
    weight = 1 + 0.5 * randn(k, dtype=dtype, seed=1)
    quant = ActivationQuant(group)
    if with_residual:
        residual = randn(rows, k, dtype=dtype, seed=2)
        residual[0, :32] = 0
        got, new_residual = fused_quant.rms_norm_quant_fp8(x, residual, weight, 1e-5, quant)
        out, want_residual = fused_ops.fused_add_rms_norm(x, residual, weight, 1e-5)
        assert torch.equal(new_residual, want_residual)
    else:
        got, new_residual = fused_quant.rms_norm_quant_fp8(x, None, weight, 1e-5, quant)
        out = fused_ops.rms_norm(x, weight, 1e-5)
        assert new_residual is None
    assert_same(got, quantize_activation(out, quant))


def test_rms_norm_quant_promotes_and_keeps_leading_dims(poisoned_outputs) -> None:
    """bf16 x over an fp32 residual and weight: the norm's output (and so the activation's dtype) is fp32;
    [2, 3, K] in, rows flattened; rows read with a stride."""
    x = randn(2, 3, 2 * 256, dtype=torch.bfloat16, seed=3)[..., :256]
    residual, weight = randn(2, 3, 256, dtype=torch.float32, seed=4), randn(256, dtype=torch.float32, seed=5)
    got, new_residual = fused_quant.rms_norm_quant_fp8(x, residual, weight, 1e-6, ActivationQuant(128))
    out, want_residual = fused_ops.fused_add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(new_residual, want_residual) and got.dtype == torch.float32 and got.q.shape == (6, 256)
    assert_same(got, quantize_activation(out, ActivationQuant(128)))


# (rows, d, group); per token (None) is the unfused composition by design (``silu_and_mul_quant_fp8``).
SILU_CASES = [(1, 288, None), (5, 288, 32), (3, 256, 128), (2, 4800, None), (2, 4864, 128), (2, 288, 96)]


@pytest.mark.parametrize("rows,d,group", SILU_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_silu_and_mul_quant_is_silu_mul_then_quantizer(rows, d, group, dtype, chunk, poisoned_outputs,
                                                       monkeypatch) -> None:
    monkeypatch.setattr(fused_quant, "_CHUNK", chunk)
    x = randn(rows, 2 * d, dtype=dtype, seed=d + rows, scale=2.0)
    x[0, :32] = 0
    got = fused_quant.silu_and_mul_quant_fp8(x, ActivationQuant(group))
    assert_same(got, quantize_activation(fused_ops.silu_and_mul(x), ActivationQuant(group)))


@pytest.mark.skipif(not CUDA, reason="real shapes are too slow for the interpreter")
@pytest.mark.parametrize("rows", [1, 16, 300])
@pytest.mark.parametrize("group", [None, 128])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_real_shapes_on_gpu(rows, group, chunk, monkeypatch) -> None:
    """Llama-3.1-8B's: hidden 4096 (input and post-attention norms), intermediate 14336 (SiLU-mul), bf16."""
    monkeypatch.setattr(fused_quant, "_CHUNK", chunk)
    quant = ActivationQuant(group)
    x, residual = randn(rows, 4096, dtype=torch.bfloat16, seed=12), randn(rows, 4096, dtype=torch.bfloat16, seed=13)
    weight = 1 + 0.1 * randn(4096, dtype=torch.bfloat16, seed=14)
    got, new_residual = fused_quant.rms_norm_quant_fp8(x, residual, weight, 1e-5, quant)
    out, want_residual = fused_ops.fused_add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(new_residual, want_residual)
    assert_same(got, quantize_activation(out, quant))
    assert_same(fused_quant.rms_norm_quant_fp8(x, None, weight, 1e-5, quant)[0],
                quantize_activation(fused_ops.rms_norm(x, weight, 1e-5), quant))
    gate_up = randn(rows, 2 * 14336, dtype=torch.bfloat16, seed=15)
    assert_same(fused_quant.silu_and_mul_quant_fp8(gate_up, quant),
                quantize_activation(fused_ops.silu_and_mul(gate_up), quant))


def test_no_rows_and_bad_shapes() -> None:
    weight = torch.ones(256, device=DEVICE)
    empty, _ = fused_quant.rms_norm_quant_fp8(torch.empty(0, 256, device=DEVICE), None, weight, 1e-6, PER_TOKEN)
    assert empty.q.shape == (0, 256) and empty.scale.shape == (0, 1)
    with pytest.raises(ValueError, match="multiple of the group size"):
        fused_quant.rms_norm_quant_fp8(torch.ones(2, 256, device=DEVICE), None, weight, 1e-6, ActivationQuant(96))
    with pytest.raises(ValueError, match="multiple of the group size"):
        fused_quant.silu_and_mul_quant_fp8(torch.ones(2, 200, device=DEVICE), ActivationQuant(64))


# --- the activation type and the layers --------------------------------------------------------------------------

def test_fp8_activation_dequantizes_as_the_cpu_path_rounds() -> None:
    x = randn(3, 4, 256, dtype=torch.float32, seed=6)
    for group in (None, 64):
        act = quantize_activation(x, ActivationQuant(group))
        assert act.shape == x.shape and act.is_cuda == CUDA
        assert torch.equal(act.dequantize().cpu(), round_activations(x.cpu(), group or 256))
    with pytest.raises(ValueError, match="quantizes per 64"):
        quantize_activation(x, PER_TOKEN).check(ActivationQuant(64))
    with pytest.raises(ValueError, match="quantizes per token"):
        quantize_activation(x, ActivationQuant(64)).check(PER_TOKEN)


def test_the_fusion_decision() -> None:
    """Fused on CUDA tensors only: elsewhere the layers return what they return without ``quant``."""
    assert fused_quant_for(torch.ones(1)) is None
    if CUDA:
        assert fused_quant_for(torch.ones(1, device="cuda")) is fused_quant
    norm, act = RMSNorm(256, dtype=torch.float32), SiluAndMul()
    x, residual = randn(2, 256, dtype=torch.float32, seed=7).cpu(), randn(2, 256, dtype=torch.float32, seed=8).cpu()
    assert torch.equal(norm(x, quant=PER_TOKEN), norm(x))
    for got, want in zip(norm(x, residual, ActivationQuant(128)), norm(x, residual)):
        assert torch.equal(got, want)
    assert torch.equal(act(x, PER_TOKEN), act(x))


def force_fusion(monkeypatch: pytest.MonkeyPatch, fuse: bool) -> None:
    """The layers run the Triton norm / SiLU-mul kernels on CPU tensors too (so fused and unfused share their
    arithmetic), and fuse the quantization where ``fuse``."""
    for module in (layernorm, activation):
        monkeypatch.setattr(module, "fused_ops_for", lambda x: fused_ops)
        monkeypatch.setattr(module, "fused_quant_for", lambda x: fused_quant if fuse else None)


def test_layers_return_the_fused_activation(monkeypatch) -> None:
    force_fusion(monkeypatch, fuse=True)
    norm, act = RMSNorm(256, dtype=torch.bfloat16).to(DEVICE), SiluAndMul()
    norm.weight.copy_(1 + 0.5 * randn(256, dtype=torch.bfloat16, seed=9))
    x, residual = (randn(3, 256, dtype=torch.bfloat16, seed=s) for s in (10, 11))
    assert_same(norm(x, quant=PER_TOKEN), quantize_activation(fused_ops.rms_norm(x, norm.weight, norm.eps), PER_TOKEN))
    got, new_residual = norm(x, residual, ActivationQuant(128))
    out, want_residual = fused_ops.fused_add_rms_norm(x, residual, norm.weight, norm.eps)
    assert torch.equal(new_residual, want_residual)
    assert_same(got, quantize_activation(out, ActivationQuant(128)))
    assert_same(act(x, PER_TOKEN), quantize_activation(fused_ops.silu_and_mul(x), PER_TOKEN))
    assert torch.equal(norm(x), fused_ops.rms_norm(x, norm.weight, norm.eps))  # no quant asked: a tensor
