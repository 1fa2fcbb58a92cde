"""``PartialSums``: the decode GEMV leaving its split-K partials for the norm after it to add
(``radixlm.kernels.partial_sums``).  The consumer must give the bits of the GEMV's own reduction followed by the
plain consumer, so everything here is compared bit for bit.  Without CUDA the kernels run under the Triton
interpreter; ``tests/parity/test_fp8_fused.py`` checks whole models."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported: decoration picks the mode

import pytest  # noqa: E402

from radixlm.kernels import fused_ops, fused_quant  # noqa: E402
from radixlm.kernels.fp8_activation import ActivationQuant  # noqa: E402
from radixlm.kernels.fp8_gemm import per_token_group_quant_fp8_triton  # noqa: E402
from radixlm.kernels.fp8_gemv import GemvConfig, fp8_gemv  # noqa: E402
from radixlm.kernels.partial_sums import PartialSums  # noqa: E402
from radixlm.layers.fp8_linear import quantize_online  # noqa: E402
from radixlm.layers.layernorm import RMSNorm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter's fp32 -> bf16 cast truncates where torch rounds: bf16 sums are compared on a GPU only.
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def gemv_operands(m: int, n: int, k: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w_q, w_s = quantize_online(torch.randn(n, k, generator=gen) / k**0.5)
    x = (torch.randn(m, k, generator=gen) * 2).to(torch.bfloat16).to(DEVICE)
    x_q, x_s = per_token_group_quant_fp8_triton(x, 128)
    return x_q, x_s, w_q.to(DEVICE), w_s.to(DEVICE)


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("split", [1, 2, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_returns_what_it_would_have_reduced(m, split, dtype) -> None:
    """``reduce=False``: a split launch returns its partials, which ``materialize`` adds to the reduced launch's
    output bit for bit; an unsplit launch returns the output itself."""
    operands = gemv_operands(m, 96, 512)
    config = GemvConfig(64, 128, 4, 2, split_k=split)
    reduced = fp8_gemv(*operands, None, dtype, config)
    left = fp8_gemv(*operands, None, dtype, config, reduce=False)
    if split == 1:
        assert isinstance(left, torch.Tensor) and torch.equal(left, reduced)
        return
    assert isinstance(left, PartialSums) and left.parts.shape == (split, m, 96) and left.shape == (m, 96)
    assert left.dtype == dtype and left.is_cuda == (DEVICE == "cuda")
    assert torch.equal(left.materialize(), reduced)
    assert not torch.equal(left.parts[0], left.parts[1])  # each split holds its own share


def partials(m: int, hidden: int, splits: int, seed: int, dtype: torch.dtype) -> PartialSums:
    gen = torch.Generator().manual_seed(seed)
    return PartialSums((torch.randn(splits, m, hidden, generator=gen) * 3).to(DEVICE), dtype)


@pytest.mark.parametrize("m,hidden,splits", [(1, 256, 4), (5, 384, 2), (2, 2304, 8)])
@pytest.mark.parametrize("group", [None, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_norms_add_the_partials_as_they_read_them(m, hidden, splits, group, dtype) -> None:
    """add + RMSNorm (+ the quantizer) of ``PartialSums``: the bits of the same norm of the materialized tensor
    (new residual, output, quantized output and scales); RMSNorm without a residual too."""
    x = partials(m, hidden, splits, seed=hidden, dtype=dtype)
    dense = x.materialize()
    residual = torch.randn(m, hidden, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    weight = (1 + torch.rand(hidden, generator=torch.Generator().manual_seed(2))).to(dtype).to(DEVICE)
    out, new_residual = fused_ops.fused_add_rms_norm(x, residual, weight, 1e-6)
    want_out, want_residual = fused_ops.fused_add_rms_norm(dense, residual, weight, 1e-6)
    assert torch.equal(out, want_out) and torch.equal(new_residual, want_residual)
    assert torch.equal(fused_ops.rms_norm(x, weight, 1e-6), fused_ops.rms_norm(dense, weight, 1e-6))
    quant = ActivationQuant(group)
    got, got_residual = fused_quant.rms_norm_quant_fp8(x, residual, weight, 1e-6, quant)
    want, _ = fused_quant.rms_norm_quant_fp8(dense, residual, weight, 1e-6, quant)
    assert torch.equal(got_residual, want_residual)
    assert torch.equal(got.q.view(torch.uint8), want.q.view(torch.uint8)) and torch.equal(got.scale, want.scale)
    assert (got.dtype, got.shape) == (want.dtype, want.shape)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_layer_takes_partials_anywhere(dtype) -> None:
    """The layer on any device: the kernels add them (CUDA, and here the interpreter through fused_ops), CPU
    code paths add them first; the same result as the materialized tensor."""
    norm = RMSNorm(256, 1e-6, dtype).to(DEVICE)
    norm.weight.data.uniform_(0.5, 1.5, generator=torch.Generator(DEVICE).manual_seed(0))
    x = partials(3, 256, 4, seed=5, dtype=dtype)
    residual = torch.randn(3, 256, generator=torch.Generator().manual_seed(6)).to(dtype).to(DEVICE)
    out, new_residual = norm(x, residual)
    want_out, want_residual = norm(x.materialize(), residual)
    assert torch.equal(out, want_out) and torch.equal(new_residual, want_residual)
