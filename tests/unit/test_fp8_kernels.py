"""``radixlm.kernels.fp8`` / ``fp8_gemm`` and the block-FP8 experts of ``fused_experts``: activation quantization
against its definition, the block-scaled GEMM and the fused MoE against references built from the dequantized
operands.

Without CUDA the Triton kernels run under the interpreter on CPU tensors (called directly: the dispatchers send
CPU tensors to torch).  The interpreter's fp8 ``tl.dot`` is exact (fp8 values widen exactly), so the GEMMs are
checked there.  Its fp32 -> fp8 cast misrounds (drops a carry into the next binade, rounds ties away from zero,
truncates subnormals), so the kernels round to E4M3 in arithmetic (``fp8_gemm.round_to_e4m3``) and cast only
exact values: the quantizer is compared bit for bit with torch on both.  The interpreter's fp32 -> bf16 cast
truncates, so bf16 outputs get twice the rounding bound there.  On sm_90 an FP8 ``tl.dot`` needs K tiles of
>= 32, so every block here is at least 32 wide, and it accumulates each K tile with reduced precision (about 14
significand bits, DeepSeek-V3's report), so the FP8 GEMMs' bound on a GPU is ``FP8_DOT_REL``.

Error bounds (E4M3: 3 mantissa bits, so round-to-nearest errs by at most 2^-4 relative for normal values and by
at most half the subnormal spacing, 2^-10, times the scale below 2^-6):
- same quantized operands as the reference: every fp8 product is exact in fp32 and only the fp32 summation
  order differs (the kernel scales per K slice, the reference per element), so the relative Frobenius error is
  a few fp32 ulps; asserted < 1e-5 (``FP8_DOT_REL``: 1e-3 on a GPU, for the reduced-precision accumulation);
- the decode GEMV (``fp8_gemv``) in exact mode widens the fp8 operands to fp16 for an fp32-accumulated dot:
  against the float64 product of the torch-quantized operands, a few fp32 ulps on every device (< 1e-6); its
  native FP8 dot is exact per product too, accumulating each K tile with ``FP8_DOT_REL`` on a GPU;
- unquantized activations in the reference: elementwise |out - ref| <= sum_k |w_k| * max(2^-4 |x_k|, 2^-10 s_k)
  (plus fp32 slack), asserted elementwise;
- fused MoE with fp8 experts against the float64 emulation that quantizes the activations as the path does:
  ``FP8_DOT_REL`` for fp32 (no activation lands within fp32 noise of an fp8 rounding boundary at these seeds), 2e-3 for fp16
  (the intermediate and the per-pair outputs are rounded to fp16 from slightly different fp32 / fp64 values).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported: decoration picks the mode

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from radixlm.kernels.fp8 import (  # noqa: E402
    FP8_DTYPE, FP8_MAX, SCALE_EPS, dequantize_block_fp8, fp8_block_linear, per_token_group_quant_fp8,
    per_token_group_quant_fp8_torch, quantize_block_fp8, round_activations, w8a8_block_fp8_matmul,
    w8a8_block_fp8_matmul_torch,
)
from radixlm.kernels.fp8_gemm import (  # noqa: E402
    default_fp8_config, per_token_group_quant_fp8_triton, per_token_quant_fp8_triton, w8a8_block_fp8_matmul_triton,
)
from radixlm.kernels.fp8_gemv import GemvConfig, fp8_gemv  # noqa: E402
from radixlm.kernels.fp8_gemv import _counters as fp8_gemv_counters  # noqa: E402
from radixlm.kernels.fused_moe import fused_experts, fused_experts_torch  # noqa: E402
from radixlm.kernels.gemm_config import GemmConfig  # noqa: E402
from radixlm.kernels.moe_gemm import fused_experts_triton  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
FP8_DOT_REL = 1e-3 if CUDA else 1e-5


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.cpu().double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


def quantize_weight(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A block-FP8 weight ``[..., N, K]`` as a checkpoint stores it (scale = block max / 448, partial edge blocks)."""
    bn, bk = block
    *lead, n, k = w.shape
    padded = F.pad(w.float(), (0, cdiv(k, bk) * bk - k, 0, cdiv(n, bn) * bn - n))
    blocks = padded.reshape(*lead, cdiv(n, bn), bn, cdiv(k, bk), bk)
    scale = blocks.abs().amax(dim=(-3, -1)).clamp_min(SCALE_EPS) / FP8_MAX  # [..., N blocks, K blocks]
    full = scale.repeat_interleave(bn, dim=-2)[..., :n, :].repeat_interleave(bk, dim=-1)[..., :k]
    return (w.float() / full).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def quantize_activation(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token-group quantization of ``x [M, K]`` for any K: the last group is zero-padded."""
    k = x.shape[1]
    x_q, x_s = per_token_group_quant_fp8_torch(F.pad(x, (0, cdiv(k, group) * group - k)), group)
    return x_q[:, :k].contiguous(), x_s


def make_x(m: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # Per-row magnitudes spread over decades, as activations' are, with one all-zero row segment.
    x = torch.randn(m, k, generator=gen) * torch.logspace(-3, 2, m)[:, None]
    x[0, :16] = 0
    return x.to(dtype)


# --- activation quantization -------------------------------------------------------------------------------

@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("group", [16, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quant_matches_definition(m, group, dtype) -> None:
    x = make_x(m, 256, dtype)
    x_q, scales = per_token_group_quant_fp8(x, group)  # CPU: the torch code
    assert x_q.dtype == FP8_DTYPE and x_q.shape == x.shape
    assert scales.dtype == torch.float32 and scales.shape == (m, 256 // group)
    xf = x.float().view(m, -1, group)
    amax = xf.abs().amax(-1)
    expected_scales = torch.where(amax > 0, amax, torch.full_like(amax, SCALE_EPS)) / 448.0
    assert torch.equal(scales, expected_scales)
    assert torch.equal(x_q.view(m, -1, group).float(), (xf / expected_scales[..., None]).to(FP8_DTYPE).float())
    deq = x_q.view(m, -1, group).float() * scales[..., None]
    # round trip: 2^-4 relative for normal fp8 values, half the subnormal spacing (2^-10) times the scale below
    bound = torch.maximum(xf.abs() * 2.0**-4, scales[..., None] * 2.0**-10) * (1 + 1e-6)
    assert ((deq - xf).abs() <= bound).all()
    assert (x_q.view(m, -1, group)[0, 0] == 0).all() if group == 16 else True  # the all-zero group: zeros
    assert torch.isfinite(deq).all()
    # each nonzero group's largest magnitude lands exactly on the fp8 maximum
    top = x_q.view(m, -1, group).float().abs().amax(-1)
    assert torch.equal(top[amax > 0], torch.full_like(top[amax > 0], 448.0))


@pytest.mark.parametrize("m,k,group", [(1, 256, 128), (5, 256, 16), (33, 96, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quant_triton_matches_torch(m, k, group, dtype) -> None:
    x = make_x(m, k, dtype, seed=1)
    x_q, scales = per_token_group_quant_fp8_triton(x.to(DEVICE), group)
    ref_q, ref_s = per_token_group_quant_fp8_torch(x, group)
    assert torch.equal(scales.cpu(), ref_s)
    assert torch.equal(x_q.cpu().float(), ref_q.float())


def test_quant_rejects_ragged_k() -> None:
    with pytest.raises(ValueError, match="multiple of the group size"):
        per_token_group_quant_fp8(torch.randn(2, 200), 128)
    with pytest.raises(ValueError, match="multiple of the group size"):
        per_token_group_quant_fp8_triton(torch.randn(2, 40, device=DEVICE), 16)


@pytest.mark.parametrize("shape,block", [((3, 40, 24), (16, 8)), ((200, 256), (128, 128)), ((5, 7), (16, 16))])
def test_block_weight_quantization(shape, block) -> None:
    """``quantize_block_fp8`` (online FP8 experts) is the checkpoint format's definition (``quantize_weight``):
    bit-identical, partial edge blocks and leading (expert) dimensions included, and dequantizes to within
    E4M3's rounding (2^-4 relative) of the input."""
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(shape, generator=gen) * torch.logspace(-2, 1, shape[-1])
    w_q, w_s = quantize_block_fp8(w.bfloat16(), block)
    ref_q, ref_s = quantize_weight(w.bfloat16(), block)
    assert w_q.dtype == FP8_DTYPE and w_s.shape == (*shape[:-2], cdiv(shape[-2], block[0]), cdiv(shape[-1], block[1]))
    assert torch.equal(w_q.view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(w_s, ref_s)
    back = dequantize_block_fp8(w_q, w_s, block)
    full_s = w_s.repeat_interleave(block[0], -2)[..., :shape[-2], :].repeat_interleave(block[1], -1)[..., :shape[-1]]
    assert ((back - w.bfloat16().float()).abs() <= w.bfloat16().float().abs() * 2.0**-4 + full_s * 2.0**-10).all()


# --- block-scaled GEMM -------------------------------------------------------------------------------------

def gemm_case(m: int, n: int, k: int, block: tuple[int, int], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=gen)
    # Weight blocks of different magnitudes, so a scale applied to the wrong block shows.
    w = torch.randn(n, k, generator=gen) * torch.rand(cdiv(n, block[0]), cdiv(k, block[1]), generator=gen).add(
        0.1).repeat_interleave(block[0], 0)[:n].repeat_interleave(block[1], 1)[:, :k]
    a_q, a_s = quantize_activation(a, block[1])
    w_q, w_s = quantize_weight(w, block)
    return a, a_q, a_s, w_q, w_s


@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("n,k,block,config", [
    (200, 256, (32, 32), GemmConfig(16, 64, 32, group_m=2)),  # N not a multiple of the block or tile
    (40, 250, (32, 32), GemmConfig(16, 32, 32, group_m=2)),  # partial last K block (masked)
    (48, 192, (64, 64), GemmConfig(32, 16, 32, group_m=1)),  # two K tiles per scale slice; bn > BLOCK_N
    (72, 256, (128, 128), None),  # the default heuristic at DeepSeek-V3's block
])
def test_gemm_matches_dequantized_reference(m, n, k, block, config) -> None:
    a, a_q, a_s, w_q, w_s = gemm_case(m, n, k, block)
    args = [t.to(DEVICE) for t in (a_q, a_s, w_q, w_s)]
    out = w8a8_block_fp8_matmul_triton(*args, block, torch.float32, config)
    assert out.shape == (m, n) and out.dtype == torch.float32
    w = dequantize_block_fp8(w_q, w_s, block).double()
    a_deq = a_q.double() * a_s.double().repeat_interleave(block[1], 1)[:, :k]
    exact = a_deq @ w.T
    assert rel_err(out, exact) < FP8_DOT_REL
    assert rel_err(w8a8_block_fp8_matmul_torch(a_q, a_s, w_q, w_s, block, torch.float32), exact) < 1e-5
    # bf16 output: one rounding, at most 2^-8 relative per element (2^-7: the interpreter truncates)
    out_bf16 = w8a8_block_fp8_matmul_triton(*args, block, torch.bfloat16, config)
    assert out_bf16.dtype == torch.bfloat16 and rel_err(out_bf16, exact) < (2.0**-7 if INTERPRETED else 2.0**-8)
    # against the unquantized activations: each a_k errs by at most max(2^-4 |a_k|, 2^-10 s_k)
    a_err = torch.maximum(a.double().abs() * 2.0**-4, a_s.double().repeat_interleave(block[1], 1)[:, :k] * 2.0**-10)
    bound = a_err @ w.abs().T + FP8_DOT_REL * (a.double().abs() @ w.abs().T)
    assert ((out.cpu().double() - a.double() @ w.T).abs() <= bound).all()


def test_gemm_dispatch_and_shape_checks() -> None:
    _, a_q, a_s, w_q, w_s = gemm_case(3, 40, 64, (32, 32))
    cpu = w8a8_block_fp8_matmul(a_q, a_s, w_q, w_s, (32, 32), torch.float16)  # CPU tensors: the torch path
    assert cpu.dtype == torch.float16 and torch.equal(cpu, w8a8_block_fp8_matmul_torch(a_q, a_s, w_q, w_s, (32, 32),
                                                                                         torch.float16))
    with pytest.raises(ValueError, match="shapes disagree"):
        w8a8_block_fp8_matmul_triton(a_q, a_s, w_q, w_s, (64, 32))
    with pytest.raises(ValueError, match="must divide"):
        w8a8_block_fp8_matmul_triton(a_q, a_s, w_q, w_s, (32, 32), config=GemmConfig(16, 16, 64))
    decode, prefill = default_fp8_config(1, 4096, 4096, (128, 128)), default_fp8_config(4096, 4096, 4096, (128, 128))
    assert decode.block_m == 16 and prefill.block_m > decode.block_m and decode.block_k == 128


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_block_linear_cpu(dtype) -> None:
    """The CPU path: the weight dequantized, the activations rounded per token group as the GPU path quantizes
    them (``round_activations``), F.linear in float32, x's dtype out."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 256, generator=gen).to(dtype)
    w_q, w_s = quantize_weight(torch.randn(200, 256, generator=gen), (128, 128))
    bias = torch.randn(200, generator=gen).to(dtype)
    out = fp8_block_linear(x, w_q, w_s, bias)
    assert out.shape == (2, 3, 200) and out.dtype == dtype
    expected = round_activations(x, 128).double() @ dequantize_block_fp8(w_q, w_s).double().T + bias.double()
    assert rel_err(out, expected) < (1e-6 if dtype == torch.float32 else 2.0**-8)


@pytest.mark.parametrize("row_tile", [16384, 64])  # one tile in registers; 64: the two-pass loop over K
@pytest.mark.parametrize("m,k", [(1, 200), (3, 4096)])
def test_per_token_quantizer_matches_torch(monkeypatch, row_tile, m, k) -> None:
    import radixlm.kernels.fp8_gemm as fp8_gemm

    monkeypatch.setattr(fp8_gemm, "_ROW_TILE", row_tile)
    x = make_x(m, k, torch.float32, seed=k)
    x_q, x_s = per_token_quant_fp8_triton(x.to(DEVICE))
    ref_q, ref_s = per_token_group_quant_fp8_torch(x, k)
    assert torch.equal(x_q.cpu().float(), ref_q.float()) and torch.equal(x_s.cpu(), ref_s)


# --- decode GEMV -----------------------------------------------------------------------------------------

def quantized_product(x: torch.Tensor, w_q: torch.Tensor, w_s: torch.Tensor, block,
                      x_group: int | None = None) -> torch.Tensor:
    """float64 ``x_q @ W^T`` with ``x`` quantized by the torch definition (per token, per ``bk`` group of a
    block weight, or per ``x_group``)."""
    k = x.shape[1]
    group = x_group or (k if block is None else block[1])
    x_q, x_s = per_token_group_quant_fp8_torch(x, group)
    x_deq = x_q.double() * x_s.double().repeat_interleave(group, 1)
    w = w_q.double() * w_s.double()[:, None] if block is None else dequantize_block_fp8(w_q, w_s, block).double()
    return x_deq @ w.T


@pytest.mark.parametrize("m", [1, 5, 16, 21])  # 21: a second 16-row tile
@pytest.mark.parametrize("n,k,block,x_group,config", [
    (72, 96, None, None, GemvConfig(64, 32, 4, 2, preload=0)),  # per channel; N, K not multiples of the tile
    (40, 200, None, None, GemvConfig(64, 64, 4, 3, split_k=3)),  # per channel, a partial last K tile, split K
    (72, 128, None, 32, GemvConfig(64, 128, 4, 2)),  # per channel, grouped activations (K tile = the group)
    (40, 256, None, 64, GemvConfig(64, 128, 4, 2, split_k=2)),  # per channel, grouped activations, split K
    (136, 128, (32, 32), None, GemvConfig(64, 0, 4, 2)),  # block: a partial last N block of the scales
    (64, 192, (128, 64), None, GemvConfig(64, 0, 4, 2, split_k=2)),  # block: bn > BLOCK_N, split K
    # weight tiles requested before the PDL wait: a split whose range is shorter than the preload, one past K
    (40, 200, None, None, GemvConfig(64, 64, 4, 3, split_k=3, preload=2)),
    (64, 192, (128, 64), None, GemvConfig(64, 0, 4, 2, preload=1)),  # block weights, one tile ahead
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gemv_matches_quantized_reference(m, n, k, block, x_group, config, dtype) -> None:
    """Exact mode (float32 outputs: fp16-widened dots) within a few fp32 ulps of the float64 product of the
    torch-quantized operands; the native FP8 dot (16-bit outputs) within the output's rounding and, on a GPU,
    ``FP8_DOT_REL``.  A split launch leaves its counters zeroed and repeats bit for bit."""
    gen = torch.Generator().manual_seed(7)
    x = make_x(m, k, dtype, seed=m)
    w = torch.randn(n, k, generator=gen)
    if block is None:
        w_s = w.abs().amax(1) / FP8_MAX
        w_q = (w / w_s[:, None]).to(FP8_DTYPE)
        x_q, x_s = (per_token_quant_fp8_triton(x.to(DEVICE)) if x_group is None
                    else per_token_group_quant_fp8_triton(x.to(DEVICE), x_group))
    else:
        w_q, w_s = quantize_weight(w, block)
        x_q, x_s = per_token_group_quant_fp8_triton(x.to(DEVICE), block[1])
    ref_q, ref_s = per_token_group_quant_fp8_torch(x, x_group or (k if block is None else block[1]))
    assert torch.equal(x_q.cpu().float(), ref_q.float()) and torch.equal(x_s.cpu(), ref_s)  # the row quantizer
    expected = quantized_product(x, w_q, w_s, block, x_group)
    args = (x_q, x_s, w_q.to(DEVICE), w_s.to(DEVICE), block)
    out = fp8_gemv(*args, torch.float32, config)
    assert out.shape == (m, n) and out.dtype == torch.float32
    assert rel_err(out, expected) < 1e-6
    out_x = fp8_gemv(*args, dtype, config, exact=False)
    assert out_x.dtype == dtype and rel_err(out_x, expected) < 2.0**-10 + FP8_DOT_REL
    if config.split_k > 1:
        assert not fp8_gemv_counters(DEVICE).any()
        assert torch.equal(fp8_gemv(*args, dtype, config, exact=False), out_x)
    assert rel_err(fp8_gemv(*args, dtype), expected) < 2.0**-10 + FP8_DOT_REL  # the default config


def test_gemv_argument_checks() -> None:
    w_q = torch.zeros(40, 64, dtype=FP8_DTYPE)
    x_q = torch.zeros(1, 64, dtype=FP8_DTYPE)
    with pytest.raises(ValueError, match="needs scales"):
        fp8_gemv(x_q, torch.ones(1, 1), w_q, torch.ones(20))
    with pytest.raises(ValueError, match="needs K a multiple"):
        fp8_gemv(x_q, torch.ones(1, 2), w_q, torch.ones(1, 2), (32, 32))
    with pytest.raises(ValueError, match="needs K a multiple"):
        fp8_gemv(x_q, torch.ones(1, 2), w_q, torch.ones(2, 2), (32, 48))
    with pytest.raises(ValueError, match="preload is 0, 1 or 2"):
        fp8_gemv(x_q, torch.ones(1, 1), w_q, torch.ones(40), config=GemvConfig(preload=3))


def test_gemv_config_overrides(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """RADIXLM_GEMV_CONFIGS names per-shape launches; the GEMV takes them, other shapes keep the default."""
    from radixlm.kernels import fp8_gemv as gemv_module

    table = tmp_path / "gemv.json"
    table.write_text('{"40,64": [32, 128, 2, 3, 2]}')
    monkeypatch.setenv("RADIXLM_GEMV_CONFIGS", str(table))
    gemv_module.config_overrides.cache_clear()
    try:
        assert gemv_module.config_overrides() == {(40, 64): GemvConfig(32, 128, 2, 3, 2)}
        gen = torch.Generator().manual_seed(3)
        x_q = (torch.randn(2, 64, generator=gen) * 50).to(FP8_DTYPE)
        w_q = (torch.randn(40, 64, generator=gen) * 50).to(FP8_DTYPE)
        x_s, w_s = torch.rand(2, 1, generator=gen) + 0.5, torch.rand(40, generator=gen) + 0.5
        expected = (x_q.float() * x_s) @ (w_q.float() * w_s[:, None]).t()
        out = fp8_gemv(x_q.to(DEVICE), x_s.to(DEVICE), w_q.to(DEVICE), w_s.to(DEVICE), None, torch.float32)
        assert rel_err(out.cpu(), expected) < 1e-5
    finally:
        monkeypatch.delenv("RADIXLM_GEMV_CONFIGS")
        gemv_module.config_overrides.cache_clear()


# --- fused MoE with block-FP8 experts ----------------------------------------------------------------------

def moe_case(num_tokens: int, num_experts: int, hidden: int, inter: int, top_k: int, block: tuple[int, int],
             dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
    w13_q, w13_s = quantize_weight(torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5, block)
    w2_q, w2_s = quantize_weight(torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5, block)
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, top_k, generator=gen)
    return x, w13_q, w2_q, weights, ids, w13_s, w2_s


def emulated_reference(x, w13_q, w2_q, weights, ids, w13_s, w2_s, block) -> torch.Tensor:
    """The Triton path's arithmetic in float64: activations quantized per token group before each GEMM, the
    intermediate rounded to x's dtype first, the weighted per-expert outputs rounded to x's dtype.  The
    quantizer is the Triton kernel the path runs (checked bit for bit against the definition above)."""
    def quantize(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t_q, t_s = per_token_group_quant_fp8_triton(t.to(DEVICE), block[1])
        return t_q.cpu(), t_s.cpu()

    w13, w2 = dequantize_block_fp8(w13_q, w13_s, block).double(), dequantize_block_fp8(w2_q, w2_s, block).double()
    inter = w13.shape[1] // 2
    x_q, x_s = quantize(x)
    x_deq = x_q.double() * x_s.double().repeat_interleave(block[1], 1)
    tokens = torch.arange(x.shape[0]).repeat_interleave(ids.shape[1])  # [num_pairs]
    experts = ids.reshape(-1)
    gate_up = torch.einsum("pnk,pk->pn", w13[experts], x_deq[tokens])  # [num_pairs, 2 * inter]
    act = (F.silu(gate_up[:, :inter]) * gate_up[:, inter:]).to(x.dtype)
    a_q, a_s = quantize(act)
    act_deq = a_q.double() * a_s.double().repeat_interleave(block[1], 1)
    per_pair = (weights.reshape(-1, 1).double() * torch.einsum("pnk,pk->pn", w2[experts], act_deq)).to(x.dtype)
    return torch.zeros(x.shape, dtype=torch.float64).index_add_(0, tokens, per_pair.double())


@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(1, 4, 1), (5, 4, 2), (33, 8, 2)])
@pytest.mark.parametrize("block,dtype", [
    ((32, 32), torch.float32),
    ((48, 32), torch.float16),  # a scale block straddles the gate and up rows (inter 64)
])
def test_fused_moe_fp8_matches_emulation(num_tokens, num_experts, top_k, block, dtype) -> None:
    case = moe_case(num_tokens, num_experts, 32, 64, top_k, block, dtype)
    x, w13_q, w2_q, weights, ids, w13_s, w2_s = case
    out = fused_experts_triton(*(t.to(DEVICE) for t in case[:5]), config=GemmConfig(16, 32, 32, group_m=2),
                               w13_scale=w13_s.to(DEVICE), w2_scale=w2_s.to(DEVICE), block_shape=block)
    assert out.shape == x.shape and out.dtype == dtype
    expected = emulated_reference(*case, block)
    assert rel_err(out, expected) < (FP8_DOT_REL if dtype == torch.float32 else 2e-3)
    # the CPU path: the experts dequantized to float32, the activations rounded as the GPU quantizes them
    cpu = fused_experts(x, w13_q, w2_q, weights, ids, w13_s, w2_s, block)
    assert cpu.dtype == dtype
    assert rel_err(cpu, expected) < (1e-5 if dtype == torch.float32 else 2e-3)
    # the activations' two fp8 roundings, next to the unquantized torch path: at most 2^-4 relative each, about
    # 3 % each in Frobenius norm for errors uniform within half an ulp
    w13, w2 = (dequantize_block_fp8(w, s, block).to(dtype) for w, s in ((w13_q, w13_s), (w2_q, w2_s)))
    assert 0.01 < rel_err(cpu, fused_experts_torch(x, w13, w2, weights, ids).double()) < 0.1


def test_fused_moe_fp8_argument_checks() -> None:
    x, w13_q, w2_q, weights, ids, w13_s, w2_s = moe_case(2, 4, 32, 16, 2, (32, 32), torch.float32)
    with pytest.raises(ValueError, match="both"):
        fused_experts(x, w13_q, w2_q, weights, ids, w13_s, None, (32, 32))
    with pytest.raises(ValueError, match="must|need"):
        fused_experts_triton(x, w13_q, w2_q, weights, ids, config=GemmConfig(16, 16, 64), w13_scale=w13_s,
                             w2_scale=w2_s, block_shape=(32, 32))


# --- real shapes on a GPU ------------------------------------------------------------------------------------

@pytest.mark.skipif(not CUDA, reason="real shapes are too slow for the interpreter")
@pytest.mark.parametrize("m", [1, 64, 1024])
@pytest.mark.parametrize("n,k", [(576, 7168), (7168, 2048), (6144, 4096)])
def test_fp8_linear_real_shapes_on_gpu(m, n, k) -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(m, k, generator=gen).bfloat16().cuda()
    w_q, w_s = quantize_weight(torch.randn(n, k, generator=gen) / k**0.5, (128, 128))
    bias = torch.randn(n, generator=gen).bfloat16().cuda()
    out = fp8_block_linear(x, w_q.cuda(), w_s.cuda(), bias)
    assert out.dtype == torch.bfloat16
    a_q, a_s = per_token_group_quant_fp8(x)
    same_quant = w8a8_block_fp8_matmul_torch(a_q.cpu(), a_s.cpu(), w_q, w_s, (128, 128), torch.float32)
    assert rel_err(out.float() - bias.float(), same_quant) < 1e-2  # bf16 roundings of the GEMM and the bias add
    dense = x.double().cpu() @ dequantize_block_fp8(w_q, w_s).double().T
    assert rel_err(out.float() - bias.float(), dense) < 0.06  # the activations' fp8 rounding


@pytest.mark.skipif(not CUDA, reason="real shapes are too slow for the interpreter")
@pytest.mark.parametrize("num_tokens", [1, 64, 512])
def test_fused_moe_fp8_real_shapes_on_gpu(num_tokens) -> None:
    # DeepSeek-V3's routed experts at TP8 (inter 2048 / 8), 64 of the 256 experts to keep memory small.
    x, w13_q, w2_q, weights, ids, w13_s, w2_s = moe_case(num_tokens, 64, 7168, 256, 8, (128, 128), torch.bfloat16)
    out = fused_experts(*(t.cuda() for t in (x, w13_q, w2_q, weights, ids, w13_s, w2_s)), block_shape=(128, 128))
    dense = fused_experts(*(t.cuda() for t in (x, dequantize_block_fp8(w13_q, w13_s).bfloat16(),
                                                dequantize_block_fp8(w2_q, w2_s).bfloat16(), weights, ids)))
    assert rel_err(out.float(), dense.float().cpu()) < 0.1


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_fp8_paths_replay_in_a_cuda_graph() -> None:
    """The activation quantization, the block GEMM and the fp8 experts read nothing on the host: captured once,
    replayed on new inputs written into the same buffers, they equal an eager call."""
    x, w13_q, w2_q, weights, ids, w13_s, w2_s = (t.cuda() for t in moe_case(5, 16, 256, 128, 4, (128, 128),
                                                                             torch.bfloat16))
    w_q, w_s = (t.cuda() for t in quantize_weight(torch.randn(200, 256), (128, 128)))

    def step():
        return fp8_block_linear(x, w_q, w_s), fused_experts(x, w13_q, w2_q, weights, ids, w13_s, w2_s)

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    new = moe_case(5, 16, 256, 128, 4, (128, 128), torch.bfloat16, seed=1)
    x.copy_(new[0].cuda())
    ids.copy_(new[4].cuda())
    graph.replay()
    for out, expected in zip(outs, step()):
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.skipif(not CUDA, reason="real shapes are too slow for the interpreter")
@pytest.mark.parametrize("m", [1, 16, 64, 1024])  # the GEMV up to 16 rows, cuBLAS's row-wise GEMM above
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336)])
def test_online_fp8_linear_real_shapes_on_gpu(m, n, k) -> None:
    """Decode-sized M quantizes x per 128-channel group, larger M per token (``online_input_quant``)."""
    from radixlm.layers.fp8_linear import fp8_channel_linear, online_input_quant, quantize_online

    gen = torch.Generator().manual_seed(6)
    x = torch.randn(m, k, generator=gen).bfloat16()
    w_q, w_s = quantize_online(torch.randn(n, k, generator=gen) / k**0.5)
    out = fp8_channel_linear(x.cuda(), w_q.cuda(), w_s.cuda())
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    x_group = online_input_quant(k).at(m).group_size
    assert x_group == (128 if m <= 16 else None)
    assert rel_err(out.float(), quantized_product(x, w_q, w_s, None, x_group)) < 2.0**-8  # bf16 output rounding


@pytest.mark.skipif(not CUDA, reason="programmatic dependent launch needs a GPU")
@pytest.mark.parametrize("block", [None, (128, 128)], ids=["channel", "block"])
@pytest.mark.parametrize("m", [1, 16])
def test_pdl_chain_waits_for_its_producer(block, m) -> None:
    """Quantizer then GEMV with PDL (the GEMV starts early, then waits): replayed in a
    CUDA graph on new activations each time, and eagerly, the output equals the launch without PDL bit for bit.
    A GEMV that read x before the quantizer finished would see the previous replay's activations."""
    from radixlm.kernels.pdl import pdl_enabled

    if not pdl_enabled(torch.device("cuda")):
        pytest.skip("PDL needs sm_90 and RADIXLM_DISABLE_PDL unset")
    gen = torch.Generator().manual_seed(8)
    n, k = 6144, 4096
    w = torch.randn(n, k, generator=gen) / k**0.5
    if block is None:
        from radixlm.layers.fp8_linear import quantize_online

        w_q, w_s = quantize_online(w)
    else:
        w_q, w_s = quantize_weight(w, block)
    w_q, w_s = w_q.cuda(), w_s.cuda()
    x = torch.empty(m, k, dtype=torch.bfloat16, device="cuda")

    def layer(pdl: bool) -> torch.Tensor:
        x_q, x_s = (per_token_quant_fp8_triton(x, pdl=pdl) if block is None
                    else per_token_group_quant_fp8_triton(x, block[1], pdl=pdl))
        return fp8_gemv(x_q, x_s, w_q, w_s, block, pdl=pdl)

    x.copy_(torch.randn(m, k, generator=gen))
    layer(False)
    layer(True)  # compiled outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(True)
    for _ in range(5):
        x.copy_(torch.randn(m, k, generator=gen))
        graph.replay()
        expected = layer(False)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        torch.testing.assert_close(layer(True), expected, rtol=0, atol=0)


def test_pdl_only_on_cuda() -> None:
    from radixlm.kernels.pdl import pdl_launch_kwargs

    assert pdl_launch_kwargs(torch.device("cpu")) == {"PDL": False}
    assert pdl_launch_kwargs(torch.device("cpu"), enabled=True) == {"PDL": False}
