"""The C kernels of ``radixlm.kernels.cpu`` against the layers' torch code and a float64 attention reference."""

from __future__ import annotations

import pytest
import torch

from radixlm.kernels import cpu
from radixlm.layers.activation import SiluAndMul
from radixlm.layers.layernorm import RMSNorm
from radixlm.layers.rotary import RotaryEmbedding

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C compiler: the CPU kernels are not built")

DTYPES = [torch.float32, torch.bfloat16]


def _ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values of the dtype lie between a and b (same-sign finite values)."""
    bits = {torch.bfloat16: torch.int16, torch.float32: torch.int32}[a.dtype]
    return (a.view(bits).long() - b.view(bits).long()).abs()


def _assert_close_ulps(got: torch.Tensor, want: torch.Tensor, max_ulps: int, max_share: float) -> None:
    """Every element within ``max_ulps`` of the reference, and at most ``max_share`` of them differing at all.

    float32 results differ from torch's in the last bits wherever a reduction (a norm's sum of squares) or exp()
    runs in another order; they get a relative tolerance instead."""
    assert got.shape == want.shape and got.dtype == want.dtype
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=4e-6, atol=1e-6)
        return
    ulps = _ulps_apart(got, want)
    assert int(ulps.max()) <= max_ulps, f"max {int(ulps.max())} ulps apart"
    assert float((ulps > 0).float().mean()) <= max_share


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [576, 100])
def test_rms_norm_matches_torch_code(dtype: torch.dtype, hidden: int) -> None:
    torch.manual_seed(0)
    norm = RMSNorm(hidden, 1e-5, dtype)
    norm.weight.data = torch.randn(hidden).to(dtype)
    x = torch.randn(37, hidden * 2).to(dtype)[:, :hidden]  # a strided view, like a split projection
    residual = torch.randn(37, hidden).to(dtype)
    _assert_close_ulps(cpu.rms_norm(x, norm.weight, norm.eps), norm.forward_native(x), 1, 0.02)
    out, new_residual = cpu.fused_add_rms_norm(x, residual, norm.weight, norm.eps)
    want_out, want_residual = norm.forward_native(x, residual)
    assert torch.equal(new_residual, want_residual)  # the add rounds exactly like torch's
    _assert_close_ulps(out, want_out, 1, 0.02)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_torch_code(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = (torch.randn(29, 2 * 1536) * 4).to(dtype)
    got, want = cpu.silu_and_mul(x), SiluAndMul().forward_native(x)
    _assert_close_ulps(got, want, 1, 0.01)  # exp() differs from libm's in the last bits, hidden by bf16 rounding


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rotary_dim", [64, 32])
def test_rotary_is_bit_identical_to_torch_code(dtype: torch.dtype, rotary_dim: int) -> None:
    torch.manual_seed(0)
    rope = RotaryEmbedding(64, 4096, 10000.0, rotary_dim=rotary_dim)
    qkv = torch.randn(23, (9 + 2 * 3) * 64).to(dtype)
    q = qkv[:, : 9 * 64].view(23, 9, 64)  # strided views of the fused projection, as in the model
    k = qkv[:, 9 * 64 : 12 * 64].view(23, 3, 64)
    positions = torch.randint(0, 4096, (23,))
    got_q, got_k = cpu.apply_rotary(q, k, positions, rope.cos_sin_cache, rope.rotary_dim)
    want_q, want_k = rope.forward_native(positions, q, k)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)


def _reference_decode(q, k_buf, v_buf, table, rows, seq_lens, scaling, window):
    """Float64 attention of each request's query over its positions, one request and head at a time."""
    out = torch.empty(q.shape, dtype=torch.float64)
    group = q.shape[1] // k_buf.shape[1]
    for b, (row, length) in enumerate(zip(rows.tolist(), seq_lens.tolist())):
        first = max(0, length - window) if window else 0
        slots = table[row, first:length].long()
        k = k_buf[slots].double().repeat_interleave(group, dim=1)  # [len, heads, hd]
        v = v_buf[slots].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,thd->ht", q[b].double(), k) * scaling
        out[b] = torch.einsum("ht,thd->hd", scores.softmax(-1), v)
    return out


@pytest.mark.parametrize("kv_dtype", DTYPES)
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,page_size,window",
    [(9, 3, 64, 1, None), (9, 3, 64, 16, None), (8, 8, 80, 4, None), (32, 4, 128, 16, None), (4, 2, 64, 1, 50)],
)
def test_decode_attention_matches_float64(kv_dtype, num_heads, num_kv_heads, head_dim, page_size, window) -> None:
    torch.manual_seed(0)
    seq_lens = torch.tensor([1, 7, 128, 129, 300, 513])  # chunk boundaries of the kernel at 128
    bs, max_len = len(seq_lens), 600
    num_slots = (int(seq_lens.sum()) // page_size + bs + 2) * page_size
    k_buf = torch.randn(num_slots, num_kv_heads, head_dim).to(kv_dtype)
    v_buf = torch.randn(num_slots, num_kv_heads, head_dim).to(kv_dtype)
    # Pages of every request scattered over the pool (page 0 is padding), positions within a page consecutive.
    pages = (torch.randperm(num_slots // page_size - 1) + 1).tolist()
    table = torch.zeros(bs + 3, max_len, dtype=torch.int32)
    rows = torch.tensor([4, 0, 2, 7, 1, 5][:bs])
    for row, length in zip(rows.tolist(), seq_lens.tolist()):
        for p in range(-(-length // page_size)):
            start = pages.pop() * page_size
            n = min(page_size, length - p * page_size)
            table[row, p * page_size : p * page_size + n] = torch.arange(start, start + n, dtype=torch.int32)
    for q_dtype in DTYPES:
        q = torch.randn(bs, num_heads * 2, head_dim).to(q_dtype)[:, :num_heads]  # strided, like a qkv split
        got = cpu.decode_attention(q, k_buf, v_buf, table, rows, seq_lens, head_dim**-0.5, window)
        want = _reference_decode(q, k_buf, v_buf, table, rows, seq_lens, head_dim**-0.5, window)
        assert got.dtype == q_dtype and got.shape == (bs, num_heads, head_dim)
        tol = 1e-5 if q_dtype == torch.float32 else 8e-3
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def _reference_extend(q, k_buf, v_buf, table, rows, prefix_lens, extend_lens, scaling, window):
    """Float64: new token i of each request attends to positions 0 .. prefix + i (the last ``window``)."""
    out = torch.empty(q.shape, dtype=torch.float64)
    group = q.shape[1] // k_buf.shape[1]
    start = 0
    for row, prefix, n in zip(rows.tolist(), prefix_lens, extend_lens):
        slots = table[row, : prefix + n].long()
        k = k_buf[slots].double().repeat_interleave(group, dim=1)  # [len, heads, hd]
        v = v_buf[slots].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("ihd,thd->hit", q[start : start + n].double(), k) * scaling
        pos, key = torch.arange(prefix, prefix + n)[:, None], torch.arange(prefix + n)[None, :]
        allowed = (key <= pos) & ((key > pos - window) if window else True)
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[start : start + n] = torch.einsum("hit,thd->ihd", scores.softmax(-1), v)
        start += n
    return out


@pytest.mark.parametrize("kv_dtype", DTYPES)
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,window", [(9, 3, 64, None), (8, 8, 32, None), (32, 4, 128, None), (4, 2, 64, 20)]
)
def test_extend_attention_matches_float64(kv_dtype, num_heads, num_kv_heads, head_dim, window) -> None:
    """Requests with and without cached prefixes, query blocks (32) and key chunks (64) cut mid-request."""
    torch.manual_seed(0)
    prefix_lens, extend_lens = [0, 5, 70, 0, 130], [1, 40, 33, 100, 7]
    num_slots = sum(prefix_lens) + sum(extend_lens) + 16
    k_buf = torch.randn(num_slots, num_kv_heads, head_dim).to(kv_dtype)
    v_buf = torch.randn(num_slots, num_kv_heads, head_dim).to(kv_dtype)
    free = (torch.randperm(num_slots - 1) + 1).tolist()  # slots scattered over the pool, slot 0 is padding
    rows = torch.tensor([3, 0, 4, 1, 2])
    table = torch.zeros(5, 300, dtype=torch.int32)
    for row, length in zip(rows.tolist(), (p + n for p, n in zip(prefix_lens, extend_lens))):
        table[row, :length] = torch.tensor([free.pop() for _ in range(length)], dtype=torch.int32)
    for q_dtype in DTYPES:
        q = torch.randn(sum(extend_lens), num_heads * 2, head_dim).to(q_dtype)[:, :num_heads]  # strided
        plan = cpu.ExtendPlan.build(rows, prefix_lens, extend_lens)
        got = cpu.extend_attention(q, k_buf, v_buf, table, plan, head_dim**-0.5, window)
        want = _reference_extend(q, k_buf, v_buf, table, rows, prefix_lens, extend_lens, head_dim**-0.5, window)
        assert got.dtype == q_dtype and got.shape == q.shape
        tol = 1e-5 if q_dtype == torch.float32 else 8e-3
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_layers_dispatch_to_the_c_kernels_on_cpu() -> None:
    from radixlm.kernels import fused_ops_for

    norm, act, rope = RMSNorm(96, dtype=torch.bfloat16), SiluAndMul(), RotaryEmbedding(64, 32, 10000.0)
    x, residual = torch.randn(7, 96).bfloat16(), torch.randn(7, 96).bfloat16()
    assert fused_ops_for(x) is cpu and fused_ops_for(x.half()) is None  # float16: the torch code
    assert torch.equal(norm(x), cpu.rms_norm(x, norm.weight, norm.eps))
    for got, want in zip(norm(x, residual), cpu.fused_add_rms_norm(x, residual, norm.weight, norm.eps)):
        assert torch.equal(got, want)
    assert torch.equal(act(x), cpu.silu_and_mul(x))
    q, k, positions = torch.randn(7, 4, 64).bfloat16(), torch.randn(7, 2, 64).bfloat16(), torch.arange(7)
    for got, want in zip(rope(positions, q, k), cpu.apply_rotary(q, k, positions, rope.cos_sin_cache, 64)):
        assert torch.equal(got, want)


def test_disabled_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RADIXLM_DISABLE_CPU_KERNELS", "1")
    cpu._library.cache_clear()
    try:
        assert not cpu.available()
    finally:
        monkeypatch.delenv("RADIXLM_DISABLE_CPU_KERNELS")
        cpu._library.cache_clear()
    assert cpu.available()


def test_failed_build_is_logged_and_falls_back(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
                                              ) -> None:
    """A compiler that is found but fails: the kernels are unavailable (the torch code runs) and the error says
    what happened and how to skip the build."""
    monkeypatch.setenv("CC", "false")  # found on PATH, exits 1 without building anything
    cpu._library.cache_clear()
    try:
        with caplog.at_level("ERROR", logger=cpu.__name__):
            assert not cpu.available()
    finally:
        monkeypatch.delenv("CC")
        cpu._library.cache_clear()
    assert "could not be built" in caplog.text and "RADIXLM_DISABLE_CPU_KERNELS=1" in caplog.text
    assert cpu.available()


def test_decode_attention_rejects_what_it_cannot_hold() -> None:
    """Head dims off the 16-float vector width are refused; the backend then keeps the torch code for decode."""
    from radixlm.attention.cpu_backend import CpuAttnBackend

    q = torch.randn(1, 2, 24)
    kv = torch.randn(4, 1, 24)
    with pytest.raises(ValueError, match="multiple of 16"):
        cpu.decode_attention(q, kv, kv, torch.zeros(1, 4, dtype=torch.int32), torch.tensor([0]), torch.tensor([1]),
                             1.0)
    assert not CpuAttnBackend(24, 24).kernel_shapes and CpuAttnBackend(64, 64).kernel_shapes
    assert not CpuAttnBackend(576, 512).kernel_shapes  # K wider than V (an MLA latent cache): torch code


@pytest.mark.parametrize("dtype", DTYPES)
def test_prepacked_linear_matches_f_linear(dtype: torch.dtype) -> None:
    """oneDNN with the weight packed once: bf16 bit-identical to F.linear, float32 within rounding; the packed copy
    is made on first use and reused."""
    x = torch.randn(2, 33, 96).to(dtype)
    if not cpu.supports_linear(x):
        pytest.skip("oneDNN lacks native bf16 on this CPU")
    weight, bias = torch.randn(80, 96).to(dtype), torch.randn(80).to(dtype)
    got, want = cpu.linear(x, weight, bias), torch.nn.functional.linear(x, weight, bias)
    if dtype == torch.bfloat16:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    packed = weight._onednn_packed
    for rows in (1, 64, 300):
        x = torch.randn(rows, 96).to(dtype)
        out = cpu.linear(x, weight)
        assert out.shape == (rows, 80) and weight._onednn_packed is packed
        torch.testing.assert_close(out.float(), torch.nn.functional.linear(x, weight).float(), rtol=1e-2, atol=1e-2)
