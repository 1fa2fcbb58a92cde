"""``radixlm.kernels.fp8_bmm`` / ``fp8_bmm_kernel``: per-batch weight quantization against its definition, the
torch path against unquantized operands, and the Triton kernel against float64 products of the dequantized
operands.

Without CUDA the kernel runs under the Triton interpreter on CPU tensors (called directly: the dispatcher sends
CPU tensors to torch); there it rounds the activations in arithmetic (``fp8_gemm.round_to_e4m3``: the
interpreter's fp8 cast misrounds), on a GPU by the cast: either way torch's fp8 values, so the kernel is checked
against the torch definition on the same quantized operands.

Error bounds (E4M3: 3 mantissa bits, so round-to-nearest errs by at most 2^-4 relative for normal values and by
at most half the subnormal spacing, 2^-10, times the scale below 2^-6 times it):
- kernel vs the dequantized operands it multiplies: every fp8 product is exact in fp32, only the summation order
  and where the scales are applied differ: relative Frobenius error < 1e-5 (fp32 out); bf16 out adds one rounding,
  2^-9 relative per element (2^-7 under the interpreter, whose cast to bf16 truncates);
- on sm_90 an fp8 dot accumulates with reduced precision (the K tile's partial sums): 2e-3 relative on top;
- torch path vs unquantized operands: elementwise |out - ref| <= sum_k |x_k| e(w_k) + |w_k| e(x_k) + e(x_k) e(w_k),
  e(v) = max(2^-4 |v|, 2^-10 scale).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported: decoration picks the mode

import pytest  # noqa: E402

from radixlm.kernels.fp8 import FP8_DTYPE, FP8_MAX, SCALE_EPS  # noqa: E402
from radixlm.kernels.fp8_bmm import (  # noqa: E402
    activation_amax, activation_scale, fp8_bmm, fp8_bmm_torch, quantize_per_batch, round_activation,
)
from radixlm.kernels.fp8_bmm_kernel import default_bmm_config, fp8_bmm_triton  # noqa: E402
from radixlm.kernels.gemm_config import GemmConfig  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ON_GPU = pytest.mark.skipif(not CUDA, reason="needs a GPU")
FP8_DOT_REL = 2e-3 if CUDA else 0.0  # sm_90's fp8 dot accumulates a K tile with reduced precision


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.cpu().double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


def make_weights(b: int, n: int, k: int, seed: int = 0) -> torch.Tensor:
    """[B, N, K]: heads of magnitudes a decade apart, so a scale applied to the wrong head shows."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, k, generator=gen) * torch.logspace(-1, 1, b)[:, None, None]


def make_activations(m: int, b: int, k: int, seed: int = 1) -> torch.Tensor:
    """[M, B, K] float32, rows of magnitudes spread over four decades (the small ones reach E4M3's subnormals
    under the per-tensor scale)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, b, k, generator=gen) * torch.logspace(-3, 1, m)[:, None, None]


def dequantized_reference(x: torch.Tensor, w_q: torch.Tensor, w_s: torch.Tensor) -> torch.Tensor:
    """float64 ``round(x) @ (w_q * w_s)^T`` per batch."""
    return torch.einsum("mbk,bnk->mbn", round_activation(x).double(), w_q.double() * w_s.double()[:, None, None])


# --- quantization ------------------------------------------------------------------------------------------

def test_quantize_per_batch_matches_definition() -> None:
    w = make_weights(4, 24, 40)
    w[2] = 0  # an all-zero head: a finite scale, zeros
    w_q, w_s = quantize_per_batch(w)
    assert w_q.dtype == FP8_DTYPE and w_q.shape == w.shape and w_q.is_contiguous()
    assert w_s.dtype == torch.float32 and w_s.shape == (4,)
    amax = w.abs().amax(dim=(1, 2))
    assert torch.equal(w_s, amax.clamp_min(SCALE_EPS) / FP8_MAX)
    assert torch.equal(w_q.float(), (w / w_s[:, None, None]).to(FP8_DTYPE).float())
    assert (w_q[2].float() == 0).all()
    # each nonzero head's largest magnitude lands on the fp8 maximum, whatever the head's magnitude
    top = w_q.float().abs().amax(dim=(1, 2))
    assert torch.equal(top[amax > 0], torch.full_like(top[amax > 0], FP8_MAX))
    deq = w_q.float() * w_s[:, None, None]
    bound = torch.maximum(w.abs() * 2.0**-4, w_s[:, None, None] * 2.0**-10) * (1 + 1e-6)
    assert ((deq - w).abs() <= bound).all()


def test_activation_scale_is_per_tensor_on_strided_views() -> None:
    wide = torch.randn(5, 3, 24, dtype=torch.bfloat16)
    x = wide[..., :16]  # a view, as q_nope is of q
    amax = activation_amax(x)
    assert amax.shape == (1,) and amax.dtype == torch.bfloat16 and amax.item() == x.float().abs().max().item()
    assert torch.equal(activation_scale(amax), (x.float().abs().max().clamp_min(SCALE_EPS) / FP8_MAX).reshape(1))
    assert torch.equal(activation_scale(activation_amax(torch.zeros(2, 2, 2))), torch.tensor([SCALE_EPS]) / FP8_MAX)


# --- the torch path ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_error_bounded_by_e4m3(dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(7, 4, 40, generator=gen) * torch.logspace(-2, 1, 7)[:, None, None]).to(dtype)
    w = make_weights(4, 24, 40)
    w_q, w_s = quantize_per_batch(w)
    out = fp8_bmm_torch(x, w_q, w_s)
    assert out.shape == (7, 4, 24) and out.dtype == dtype
    assert torch.equal(fp8_bmm(x, w_q, w_s), out)  # CPU tensors: the dispatcher's torch path
    xd, wd = x.double(), w.double()
    s = activation_scale(activation_amax(x)).double()
    e_x = torch.maximum(xd.abs() * 2.0**-4, s * 2.0**-10)  # [M, B, K]
    e_w = torch.maximum(wd.abs() * 2.0**-4, w_s.double()[:, None, None] * 2.0**-10)  # [B, N, K]
    bound = (torch.einsum("mbk,bnk->mbn", xd.abs(), e_w) + torch.einsum("mbk,bnk->mbn", e_x, wd.abs())
             + torch.einsum("mbk,bnk->mbn", e_x, e_w))
    exact = torch.einsum("mbk,bnk->mbn", xd, wd)
    # plus the output's rounding to its dtype (bf16: 2^-9 relative) and fp32 slack
    slack = exact.abs() * (2.0**-9 if dtype == torch.bfloat16 else 1e-6) + 1e-6
    assert ((out.double() - exact).abs() <= bound + slack).all()
    # and it is the fp32 product of the rounded operands
    assert rel_err(out, dequantized_reference(x, w_q, w_s)) < (2.0**-8 if dtype == torch.bfloat16 else 1e-6)


# --- the Triton kernel -------------------------------------------------------------------------------------

@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("b,n,k,config", [
    (3, 24, 96, GemmConfig(16, 16, 32)),  # several K tiles (32 wide: an fp8 dot's smallest on a GPU); N ragged
    (2, 40, 40, GemmConfig(16, 32, 32)),  # a partial last K tile (masked)
    (4, 32, 16, None),  # the default config: K below the 32-wide tile (masked)
])
def test_kernel_matches_dequantized_reference(m, b, n, k, config) -> None:
    x = make_activations(m, b, k)
    w_q, w_s = quantize_per_batch(make_weights(b, n, k))
    expected = dequantized_reference(x, w_q, w_s)
    args = [t.to(DEVICE) for t in (x, activation_amax(x), w_q, w_s)]
    out = fp8_bmm_triton(*args, torch.float32, config)
    assert out.shape == (m, b, n) and out.dtype == torch.float32
    assert rel_err(out, expected) < 1e-5 + FP8_DOT_REL
    out_bf16 = fp8_bmm_triton(*args, torch.bfloat16, config)
    assert out_bf16.dtype == torch.bfloat16 and rel_err(out_bf16, expected) < (2.0**-7 if INTERPRETED else 2.0**-9 + FP8_DOT_REL)


def test_kernel_reads_a_strided_view() -> None:
    """q_nope is a [tokens, heads, nope] view of q [tokens, heads, nope + rope], bf16 on a GPU: the kernel reads
    its strides and widens bf16 exactly."""
    wide = torch.cat([make_activations(6, 3, 32), torch.full((6, 3, 16), 1e4)], dim=-1)  # the rope part is huge
    x = wide.bfloat16()[..., :32]
    w_q, w_s = quantize_per_batch(make_weights(3, 16, 32))
    out = fp8_bmm_triton(x.to(DEVICE), activation_amax(x).to(DEVICE), w_q.to(DEVICE), w_s.to(DEVICE),
                         torch.float32, GemmConfig(16, 16, 32))
    assert rel_err(out, dequantized_reference(x.contiguous(), w_q, w_s)) < 1e-5 + FP8_DOT_REL


def test_kernel_argument_checks_and_configs() -> None:
    w_q, w_s = quantize_per_batch(make_weights(3, 16, 32))
    x = torch.randn(2, 3, 32)
    with pytest.raises(ValueError, match="shapes disagree"):
        fp8_bmm_triton(x, activation_amax(x), w_q[:, :, :16], w_s, torch.float32)
    with pytest.raises(ValueError, match="shapes disagree"):
        fp8_bmm_triton(x, activation_amax(x), w_q.float(), w_s, torch.float32)
    empty = fp8_bmm_triton(x[:0], activation_amax(x), w_q, w_s, torch.bfloat16)
    assert empty.shape == (0, 3, 16)
    decode, extend = default_bmm_config(1, 512, 128), default_bmm_config(4096, 512, 128)
    assert decode.block_m == 16 and extend.block_m > decode.block_m and decode.block_k == 128
    assert default_bmm_config(1, 16, 16).block_k == 32  # an fp8 dot's smallest K tile on a GPU


# --- GPU: real shapes, bf16 activations through the dispatcher, CUDA graphs ------------------------------------


@ON_GPU
@pytest.mark.parametrize("m", [1, 64, 256])
@pytest.mark.parametrize("n,k", [(512, 128), (128, 512)])  # DeepSeek-V3: q_nope x W_UK, latent out x W_UV^T
def test_deepseek_v3_shapes_on_gpu(m, n, k) -> None:
    """128 heads, bf16 in and out: the torch path's float32 result within Hopper's fp8 accumulation (2e-3) plus
    the bf16 output rounding (2^-9)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(m, 128, k, generator=gen).bfloat16()
    w_q, w_s = quantize_per_batch(make_weights(128, n, k) / k**0.5)
    out = fp8_bmm(x.cuda(), w_q.cuda(), w_s.cuda())
    assert out.dtype == torch.bfloat16 and out.shape == (m, 128, n)
    assert rel_err(out.float(), fp8_bmm_torch(x, w_q, w_s, torch.float32)) < 2e-3 + 2.0**-9


@ON_GPU
def test_fp8_bmm_replays_in_a_cuda_graph() -> None:
    """The scale is computed on the device: captured once, replayed on new activations written into the same
    buffer (a different amax), the result equals an eager call."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 8, 128, generator=gen).bfloat16().cuda()
    w_q, w_s = (t.cuda() for t in quantize_per_batch(make_weights(8, 64, 128)))
    fp8_bmm(x, w_q, w_s)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8_bmm(x, w_q, w_s)
    x.copy_(torch.randn(4, 8, 128, generator=gen).bfloat16().cuda() * 7)
    graph.replay()
    torch.testing.assert_close(out, fp8_bmm(x, w_q, w_s), rtol=0, atol=0)
