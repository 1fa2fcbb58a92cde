"""The Triton kernels of ``radixlm.kernels.fused_ops`` against the layers' torch code (``forward_native`` on CPU).

Without CUDA the kernels run under the Triton interpreter on CPU tensors.  That interpreter truncates fp32 to
bf16 instead of rounding to nearest even, so bf16 is only checked on CUDA.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Read when ``triton.jit`` decorates the kernels, so it must be set before radixlm.kernels is imported.
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from radixlm.kernels import fused_ops  # noqa: E402
from radixlm.layers.activation import SiluAndMul  # noqa: E402
from radixlm.layers.layernorm import RMSNorm  # noqa: E402
from radixlm.layers.rotary import RotaryEmbedding  # noqa: E402

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not ON_CUDA, reason="interpreter truncates to bf16")),
]
# (rtol, atol) for kernels that round differently from torch: about one ulp of the dtype, a little more where
# torch rounds twice (silu before the product, the normalised row before the weight).
TOLERANCES = {torch.float32: (1e-5, 1e-6), torch.float16: (2e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5)}


def randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A CPU tensor, drawn in fp32 so every dtype sees the same values (up to rounding)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    rtol, atol = TOLERANCES[expected.dtype]
    torch.testing.assert_close(actual.cpu(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [96, 576, 4096])
@pytest.mark.parametrize("rows", [1, 7])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_torch(dtype, hidden, rows, with_residual, poisoned_outputs) -> None:
    norm = RMSNorm(hidden, eps=1e-5, dtype=dtype)
    norm.weight.copy_(1 + 0.5 * randn(hidden, dtype=dtype, seed=0))
    x = 3 * randn(rows, hidden, dtype=dtype, seed=1)
    residual = randn(rows, hidden, dtype=dtype, seed=2)
    weight = norm.weight.detach().to(DEVICE)
    if with_residual:
        expected, expected_residual = norm.forward_native(x, residual)
        out, new_residual = fused_ops.fused_add_rms_norm(x.to(DEVICE), residual.to(DEVICE), weight, norm.eps)
        # the residual stream must not drift from the torch path: same bits
        assert torch.equal(new_residual.cpu(), expected_residual)
    else:
        expected = norm.forward_native(x)
        out = fused_ops.rms_norm(x.to(DEVICE), weight, norm.eps)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    assert_close(out, expected)


def test_rms_norm_strided_rows_and_leading_dims(poisoned_outputs) -> None:
    """A [tokens, heads, head_dim] view of a wider row (the q of a fused qkv, as for Qwen3's q_norm), and
    an fp32 weight over fp16 activations, which torch promotes to an fp32 output."""
    norm = RMSNorm(96, eps=1e-6, dtype=torch.float32)
    norm.weight.copy_(randn(96, dtype=torch.float32, seed=3))
    qkv = randn(5, 4 * 96, dtype=torch.float16, seed=4)
    q = qkv[:, : 3 * 96].reshape(5, 3, 96)
    expected = norm.forward_native(q)
    out = fused_ops.rms_norm(qkv.to(DEVICE)[:, : 3 * 96].reshape(5, 3, 96), norm.weight.to(DEVICE), norm.eps)
    assert out.dtype == torch.float32 and out.shape == (5, 3, 96)
    assert_close(out, expected)


def test_rms_norm_no_rows() -> None:
    out, new_residual = fused_ops.fused_add_rms_norm(
        torch.empty(0, 96, device=DEVICE), torch.empty(0, 96, device=DEVICE), torch.ones(96, device=DEVICE), 1e-6
    )
    assert out.shape == new_residual.shape == (0, 96)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2 * 96), (7, 2 * 576), (7, 2 * 1500), (2, 3, 2 * 96)])
def test_silu_and_mul_matches_torch(dtype, shape, poisoned_outputs) -> None:
    x = 2 * randn(*shape, dtype=dtype, seed=5)
    expected = SiluAndMul().forward_native(x)
    out = fused_ops.silu_and_mul(x.to(DEVICE))
    assert out.dtype == dtype and out.shape == expected.shape
    assert_close(out, expected)


def test_silu_and_mul_strided_rows(poisoned_outputs) -> None:
    wide = randn(7, 3 * 96, dtype=torch.float32, seed=6)
    expected = SiluAndMul().forward_native(wide[:, : 2 * 96])
    assert_close(fused_ops.silu_and_mul(wide.to(DEVICE)[:, : 2 * 96]), expected)


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}


def rotary_inputs(layout: str, num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int,
                  dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """q [num_tokens, num_heads, head_dim] and k [num_tokens, num_kv_heads, head_dim] in the given layout,
    with the same values whatever the layout and device."""
    qkv = randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, seed=7).to(device)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q = qkv[:, :q_size].reshape(num_tokens, num_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].reshape(num_tokens, num_kv_heads, head_dim)
    if layout == "contiguous":
        return q.contiguous(), k.contiguous()
    if layout == "qkv_slices":  # how LlamaAttention passes them: strided, last dim contiguous
        return q, k
    # last dim strided too: every other element of a buffer twice as wide
    q_wide = torch.zeros(num_tokens, num_heads, 2 * head_dim, dtype=dtype, device=device)
    k_wide = torch.zeros(num_tokens, num_kv_heads, 2 * head_dim, dtype=dtype, device=device)
    q_wide[..., ::2], k_wide[..., ::2] = q, k
    return q_wide[..., ::2], k_wide[..., ::2]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 7])
@pytest.mark.parametrize(
    "head_dim, rotary_dim, scaling",
    [(64, 64, None), (64, 32, LLAMA3_SCALING), (96, 48, None)],  # 96/48: halves not a power of two
)
@pytest.mark.parametrize("layout", ["contiguous", "qkv_slices", "strided_last_dim"])
def test_rotary_matches_torch_bitwise(dtype, num_tokens, head_dim, rotary_dim, scaling, layout,
                                      poisoned_outputs) -> None:
    max_position, num_heads, num_kv_heads = 128, 4, 2
    rope = RotaryEmbedding(head_dim, max_position, 10000.0, scaling, rotary_dim)
    positions = torch.tensor([5, 127, 0, 64, 5, 3, 99][:num_tokens])  # out of order, repeated, both ends
    q, k = rotary_inputs(layout, num_tokens, num_heads, num_kv_heads, head_dim, dtype, "cpu")
    expected_q, expected_k = rope.forward_native(positions, q, k)
    q, k = rotary_inputs(layout, num_tokens, num_heads, num_kv_heads, head_dim, dtype, DEVICE)
    q_before, k_before = q.clone(), k.clone()
    out_q, out_k = fused_ops.apply_rotary(q, k, positions.to(DEVICE), rope.cos_sin_cache.to(DEVICE), rotary_dim)
    assert out_q.is_contiguous() and out_k.is_contiguous()
    assert torch.equal(out_q.cpu(), expected_q) and torch.equal(out_k.cpu(), expected_k)
    assert torch.equal(q, q_before) and torch.equal(k, k_before)  # inputs untouched


def test_rotary_heads_over_several_tiles(monkeypatch: pytest.MonkeyPatch, poisoned_outputs) -> None:
    """More heads than one tile holds (shrunk here so small shapes loop), and fewer kv heads than q heads."""
    monkeypatch.setattr(fused_ops, "_ROTARY_TILE", 64)  # 2 heads of rotary_dim / 2 = 32 per tile
    rope = RotaryEmbedding(64, 32, 10000.0)
    positions = torch.tensor([3, 31, 0])
    q, k = rotary_inputs("qkv_slices", 3, 5, 3, 64, torch.float32, "cpu")
    expected_q, expected_k = rope.forward_native(positions, q, k)
    out_q, out_k = fused_ops.apply_rotary(q.to(DEVICE), k.to(DEVICE), positions.to(DEVICE),
                                          rope.cos_sin_cache.to(DEVICE), 64)
    assert torch.equal(out_q.cpu(), expected_q) and torch.equal(out_k.cpu(), expected_k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cache_dtype, scales", [
    (None, None),  # the model's dtype
    (torch.float8_e4m3fn, (1.0, 1.0)),
    (torch.float8_e4m3fn, (0.02, 3.0)),  # K saturates at 0.02, V is scaled down
    (torch.float8_e5m2, (0.3, 1.0)),
])
@pytest.mark.parametrize("head_dim, rotary_dim", [(64, 64), (96, 48)])
def test_rotary_storing_kv_matches_rotary_then_pool_store(dtype, cache_dtype, scales, head_dim, rotary_dim,
                                                          poisoned_outputs) -> None:
    """The rotary kernel storing the rotated K and V at scattered slots: q bit-equal to ``forward_native``, and
    the cache holding the bytes the pool's torch store (``set_kv``) writes from ``forward_native``'s K; the
    other slots untouched."""
    from radixlm.kernels.kv_store import KVStore
    from radixlm.mem import KVCacheSpec, create_kv_pool

    num_tokens, num_heads, num_kv_heads, slots = 5, 4, 2, 12
    cache_dtype = cache_dtype or dtype
    rope = RotaryEmbedding(head_dim, 128, 10000.0, None, rotary_dim)
    positions = torch.tensor([5, 127, 0, 64, 5])
    loc = torch.tensor([9, 2, 11, 4, 7])
    qkv = 4 * randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, seed=11)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q, k, v = (t.view(num_tokens, -1, head_dim) for t in qkv.split([q_size, kv_size, kv_size], dim=-1))
    expected_q, expected_k = rope.forward_native(positions, q, k)
    pool = create_kv_pool(KVCacheSpec.mha(1, num_kv_heads, head_dim, cache_dtype), slots, 1, "cpu")
    if scales is not None:
        pool.set_kv_scales(0, *scales)
    pool.set_kv(0, loc, expected_k, v)  # the torch store

    qkv = qkv.to(DEVICE)
    q, k, v = (t.view(num_tokens, -1, head_dim) for t in qkv.split([q_size, kv_size, kv_size], dim=-1))
    k_buf, v_buf = (torch.zeros_like(b, device=DEVICE) for b in pool.get_kv_buffer(0))
    k_buf[0], v_buf[0] = 1, -1  # a slot no token writes
    k_scale, v_scale = (None, None) if scales is None else (torch.tensor([s], device=DEVICE) for s in scales)
    out_q, out_k = fused_ops.apply_rotary(q, k, positions.to(DEVICE), rope.cos_sin_cache.to(DEVICE), rotary_dim,
                                          v, KVStore(k_buf, v_buf, loc.to(DEVICE), k_scale, v_scale))
    assert out_k is None and torch.equal(out_q.cpu(), expected_q)
    for stored, expected in zip((k_buf, v_buf), pool.get_kv_buffer(0)):
        stored = stored.cpu()
        assert torch.equal(stored[loc].float(), expected[loc].float())
        assert (stored[0].float().abs() == 1).all()
    if scales is not None and scales[0] < 0.1:
        assert (pool.get_kv_buffer(0)[0][loc].float().abs() == torch.finfo(cache_dtype).max).any()  # saturated


def test_rotary_layer_stores_through_the_target_without_a_kernel() -> None:
    """Where no kernel stores (here: CPU tensors, the C or torch rotary), the layer rotates and then stores
    through ``KVStore.store`` itself, and returns no K either way."""
    from radixlm.kernels.kv_store import KVStore

    calls = []

    class Recording(KVStore):
        def store(self, k, v):
            calls.append((k, v))

    rope = RotaryEmbedding(64, 32, 10000.0)
    q, k = rotary_inputs("contiguous", 3, 4, 2, 64, torch.float32, "cpu")
    v = randn(3, 2, 64, dtype=torch.float32, seed=12)
    positions = torch.tensor([3, 0, 31])
    target = Recording(torch.empty(0), torch.empty(0), torch.empty(0), None, None)
    out_q, out_k = rope(positions, q, k, v, target)
    expected_q, expected_k = rope.forward_native(positions, q, k)
    assert out_k is None and torch.equal(out_q, expected_q)
    assert len(calls) == 1 and torch.equal(calls[0][0], expected_k) and calls[0][1] is v


@pytest.mark.skipif(not ON_CUDA, reason="the layers take the Triton path only for CUDA tensors")
def test_layers_dispatch_to_kernels_on_cuda() -> None:
    norm, act = RMSNorm(96, dtype=torch.bfloat16).to(DEVICE), SiluAndMul()
    rope = RotaryEmbedding(64, 32, 10000.0).to(DEVICE)
    x, residual = (randn(7, 96, dtype=torch.bfloat16, seed=s).to(DEVICE) for s in (8, 9))
    assert torch.equal(norm(x), fused_ops.rms_norm(x, norm.weight, norm.eps))
    for got, want in zip(norm(x, residual), fused_ops.fused_add_rms_norm(x, residual, norm.weight, norm.eps)):
        assert torch.equal(got, want)
    assert torch.equal(act(x), fused_ops.silu_and_mul(x))
    q, k = rotary_inputs("qkv_slices", 7, 4, 2, 64, torch.bfloat16, DEVICE)
    positions = torch.arange(7, device=DEVICE)
    for got, want in zip(rope(positions, q, k), fused_ops.apply_rotary(q, k, positions, rope.cos_sin_cache, 64)):
        assert torch.equal(got, want)
