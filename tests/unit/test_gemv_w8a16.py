"""The W8A16 decode GEMV (``fp8_gemv.fp8_gemv_w8a16``) and the inputs it computes on the way in
(``deferred_input``: a norm with or without the residual add, SiLU-mul), against torch.

Without CUDA the kernels run under the Triton interpreter on CPU tensors.  Bounds: the E4M3 weight widens exactly
to the activation dtype and every product is exact in fp32, so against the float64 product of the same operands
only the fp32 summation order and the output's rounding remain (fp32: < 1e-6 relative; fp16/bf16: the output's
half ulp, twice that for bf16 under the interpreter, whose fp32 -> bf16 cast truncates).  A deferred input
computed by the GEMV matches its ``materialize()`` (the producer's own kernel) but for the norm's sum of squares
reduced in another order: the same bound against the GEMV fed the materialized input, and the new residual bit
for bit.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported: decoration picks the mode

import pytest  # noqa: E402

from radixlm.kernels.deferred_input import NormedInput, SiluMulInput  # noqa: E402
from radixlm.kernels.fp8 import FP8_DTYPE, FP8_MAX  # noqa: E402
from radixlm.kernels.fp8_gemv import GemvConfig, fp8_gemv_w8a16  # noqa: E402
from radixlm.kernels.fp8_gemv import _counters as gemv_counters  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
OUT_REL = {torch.float32: 1e-6, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8 if CUDA else 2.0**-7}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.cpu().double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


def channel_weight(n: int, k: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k**0.5
    scale = w.abs().amax(1) / FP8_MAX
    return (w / scale[:, None]).to(FP8_DTYPE), scale


def reference(x: torch.Tensor, w_q: torch.Tensor, w_s: torch.Tensor) -> torch.Tensor:
    return x.double() @ (w_q.double() * w_s.double()[:, None]).T


def torch_norm(x, residual, weight, eps):
    h = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    normed = (h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight * normed, h


DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
CONFIGS = [GemvConfig(64, 32, 4, 2, preload=0), GemvConfig(64, 64, 4, 3, split_k=3, preload=2),
           GemvConfig(32, 128, 4, 2, split_k=2, preload=1)]


@pytest.mark.parametrize("m", [1, 5, 16, 21])  # 21: a second row tile
@pytest.mark.parametrize("n,k", [(72, 96), (40, 200)])  # N, K off the tiles; a partial last K tile
@pytest.mark.parametrize("config", CONFIGS, ids=["plain", "split3-preload2", "rows32-split2"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_input(m, n, k, config, dtype) -> None:
    gen = torch.Generator().manual_seed(m)
    x = (torch.randn(m, k, generator=gen) * torch.logspace(-2, 1, m)[:, None]).to(dtype)
    w_q, w_s = channel_weight(n, k)
    out = fp8_gemv_w8a16(x.to(DEVICE), w_q.to(DEVICE), w_s.to(DEVICE), config)
    assert out.shape == (m, n) and out.dtype == dtype
    assert rel_err(out, reference(x, w_q, w_s)) < OUT_REL[dtype]
    if config.split_k > 1:
        assert not gemv_counters(DEVICE).any()  # every launch leaves the counters zeroed
        assert torch.equal(fp8_gemv_w8a16(x.to(DEVICE), w_q.to(DEVICE), w_s.to(DEVICE), config), out)


@pytest.mark.parametrize("m", [1, 5, 21])
@pytest.mark.parametrize("with_residual", [False, True], ids=["norm", "add-norm"])
@pytest.mark.parametrize("config", CONFIGS, ids=["plain", "split3-preload2", "rows32-split2"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_computed_on_the_way_in(m, with_residual, config, dtype) -> None:
    n, k, eps = 72, 200, 1e-5
    gen = torch.Generator().manual_seed(10 + m)
    x = (torch.randn(m, k, generator=gen) * 3).to(dtype).to(DEVICE)
    residual = (torch.randn(m, k, generator=gen) * 2).to(dtype).to(DEVICE) if with_residual else None
    weight = (1 + torch.randn(k, generator=gen) / 4).to(dtype).to(DEVICE)
    new_residual = torch.empty_like(x) if with_residual else None
    w_q, w_s = channel_weight(n, k)
    deferred = NormedInput(x, residual, weight, eps, new_residual)
    assert deferred.shape == (m, k) and deferred.dtype == dtype
    out = fp8_gemv_w8a16(deferred, w_q.to(DEVICE), w_s.to(DEVICE), config)
    normed, h = torch_norm(x.cpu(), None if residual is None else residual.cpu(), weight.cpu(), eps)
    assert rel_err(out, reference(normed, w_q, w_s)) < 2 * OUT_REL[dtype] + (1e-6 if dtype == torch.float32 else 2.0**-9)
    if with_residual:
        assert torch.equal(new_residual.cpu(), h)  # torch's ``x + residual``, bit for bit
    if CUDA:  # the producer's own kernel, then the GEMV: the same but for the sum of squares' order
        fed = fp8_gemv_w8a16(deferred.materialize(), w_q.cuda(), w_s.cuda(), config)
        assert rel_err(out, fed.cpu()) < 2 * OUT_REL[dtype]


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("config", CONFIGS, ids=["plain", "split3-preload2", "rows32-split2"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_computed_on_the_way_in(m, config, dtype) -> None:
    n, d = 40, 200
    gate_up = (torch.randn(m, 2 * d, generator=torch.Generator().manual_seed(m)) * 2).to(dtype)
    w_q, w_s = channel_weight(n, d)
    deferred = SiluMulInput(gate_up.to(DEVICE))
    assert deferred.shape == (m, d) and deferred.dtype == dtype
    out = fp8_gemv_w8a16(deferred, w_q.to(DEVICE), w_s.to(DEVICE), config)
    g, u = gate_up.float()[:, :d], gate_up.float()[:, d:]
    act = (g * torch.sigmoid(g) * u).to(dtype)  # rounded once, as the SiLU-mul kernel does
    assert rel_err(out, reference(act, w_q, w_s)) < 2 * OUT_REL[dtype] + (1e-6 if dtype == torch.float32 else 2.0**-9)
    if CUDA:
        assert torch.equal(out, fp8_gemv_w8a16(deferred.materialize(), w_q.cuda(), w_s.cuda(), config))


def test_argument_checks() -> None:
    w_q, w_s = channel_weight(40, 64)
    x = torch.zeros(1, 64)
    with pytest.raises(ValueError, match="per-channel scales"):
        fp8_gemv_w8a16(x, w_q, torch.ones(20))
    with pytest.raises(ValueError, match="per-channel scales"):
        fp8_gemv_w8a16(torch.zeros(1, 32), w_q, w_s)
    with pytest.raises(ValueError, match="weight in the activation dtype"):
        fp8_gemv_w8a16(NormedInput(x, None, torch.ones(64, dtype=torch.float16), 1e-6, None), w_q, w_s)
    assert fp8_gemv_w8a16(torch.zeros(0, 64), w_q, w_s).shape == (0, 40)
