"""The FP8 decode GEMV's epilogues (``radixlm.kernels.fp8_gemv``) against the launches they replace, bit for bit:
SiLU-mul with down_proj's group quantization after gate_up (``fp8_gemv_silu_mul_quant`` = ``fp8_gemv`` then
``fused_quant.silu_and_mul_quant_fp8``) and RoPE with the K/V store after qkv (``fp8_gemv_rope_store`` =
``fp8_gemv`` then ``fused_ops.apply_rotary`` storing through a ``KVStore``).  Split K, tiles of other heights,
block and per-channel weights, a second 16-row tile, FP8 and 16-bit caches; the split counters left zeroed.
Without CUDA under the Triton interpreter (whose fp32 -> bf16 cast truncates, in both sides alike)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported: decoration picks the mode

import pytest  # noqa: E402

from radixlm.kernels import fused_ops, fused_quant  # noqa: E402
from radixlm.kernels.fp8 import FP8_DTYPE, FP8_MAX  # noqa: E402
from radixlm.kernels.fp8_activation import ActivationQuant, FP8Activation, quantize_activation  # noqa: E402
from radixlm.kernels.fp8_gemv import (  # noqa: E402
    GemvConfig, fp8_gemv, fp8_gemv_rope_store, fp8_gemv_silu_mul_quant, rope_store_fits, silu_mul_fits,
)
from radixlm.kernels.fp8_gemv import _counters as fp8_gemv_counters  # noqa: E402
from radixlm.kernels.kv_store import KVStore  # noqa: E402
from radixlm.layers.rotary import RotaryEmbedding  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONFIGS = {None: None, "split3": GemvConfig(64, 64, 4, 2, split_k=3), "n32": GemvConfig(32, 128, 4, 2),
           "split2": GemvConfig(64, 0, 4, 2, split_k=2)}


def randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype).to(DEVICE)


def quantized_weight(n: int, k: int, block: tuple[int, int] | None, seed: int):
    """An FP8 weight [n, k] with per-channel scales, or one scale per [bn, bk] block (whole blocks here)."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    if block is None:
        w_s = w.abs().amax(1) / FP8_MAX
        w_q = (w / w_s[:, None]).to(FP8_DTYPE)
    else:
        bn, bk = block
        blocks = w.reshape(n // bn, bn, k // bk, bk)
        w_s = blocks.abs().amax(dim=(1, 3)) / FP8_MAX  # [n / bn, k / bk]
        w_q = (blocks / w_s[:, None, :, None]).reshape(n, k).to(FP8_DTYPE)
    return w_q.to(DEVICE), w_s.to(DEVICE)


def assert_same(got: FP8Activation, want: FP8Activation) -> None:
    assert torch.equal(got.q.view(torch.uint8), want.q.view(torch.uint8)), "quantized bits differ"
    assert torch.equal(got.scale, want.scale), "scales differ"


# --- SiLU-mul and its quantizer after gate_up -------------------------------------------------------------

GEMV_SILU_CASES = [  # (rows, d, K, group, weight block, config): gate ‖ up of 2 * d rows
    (1, 128, 256, 128, None, None),  # per channel, the default launch
    (5, 256, 384, 128, None, "split3"),  # K split three ways: the group's last program sums the splits
    (16, 192, 128, 64, None, "n32"),  # 32-row tiles, four of them (two gate, two up) a group
    (3, 256, 256, 128, (128, 128), "split2"),  # block weights
    (21, 128, 256, 128, None, None),  # a second 16-row tile
]


@pytest.mark.parametrize("rows,d,k,group,block,config", GEMV_SILU_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemv_silu_mul_epilogue_is_gemv_then_silu_mul_quant(rows, d, k, group, block, config, dtype,
                                                             poisoned_outputs) -> None:
    """The same bits as the GEMV's output fed to ``silu_and_mul_quant_fp8``; the counters left zeroed."""
    config = CONFIGS[config]
    w_q, w_s = quantized_weight(2 * d, k, block, seed=rows + d)
    x = quantize_activation(randn(rows, k, dtype=dtype, seed=5, scale=2.0), ActivationQuant(128))
    h = fp8_gemv(x.q, x.scale, w_q, w_s, block, dtype, config)  # [rows, 2 * d]
    want = fused_quant.silu_and_mul_quant_fp8(h, ActivationQuant(group))
    q, scale = fp8_gemv_silu_mul_quant(x.q, x.scale, w_q, w_s, group, block, dtype, config)
    assert_same(FP8Activation(q, scale, dtype, want.shape), want)
    assert not fp8_gemv_counters(DEVICE).any()


def test_gemv_silu_mul_epilogue_refuses_what_does_not_fit() -> None:
    assert silu_mul_fits(256, 128, 128, torch.device(DEVICE))
    assert not silu_mul_fits(256, 128, None, torch.device(DEVICE))  # per token: needs the whole row
    assert not silu_mul_fits(2 * 96, 128, 64, torch.device(DEVICE))  # 96 is not whole groups of 64
    assert not silu_mul_fits(2 * 96, 128, 96, torch.device(DEVICE))  # a group must be whole 64-row tiles
    x_q = torch.zeros(1, 128, dtype=torch.float8_e4m3fn, device=DEVICE)
    with pytest.raises(ValueError, match="do not fit"):
        fp8_gemv_silu_mul_quant(x_q, torch.ones(1, 1, device=DEVICE), torch.zeros(256, 128, dtype=x_q.dtype,
                                device=DEVICE), torch.ones(256, device=DEVICE), 64, config=GemvConfig(128))


# --- RoPE and the K/V store after qkv ---------------------------------------------------------------------

ROPE_CASES = [  # (rows, q heads, kv heads, head_dim, K, weight block, config)
    (1, 4, 2, 64, 256, None, None),
    (5, 4, 1, 64, 384, None, "split3"),  # K split: a head's last program sums the splits
    (16, 2, 2, 64, 128, None, "n32"),  # 32-row tiles, two a head
    (3, 2, 1, 128, 256, (128, 128), "split2"),  # block weights
    (21, 2, 1, 64, 128, None, None),  # a second 16-row tile
]


@pytest.mark.parametrize("rows,q_heads,kv_heads,head_dim,k,block,config", ROPE_CASES)
@pytest.mark.parametrize("cache", [None, torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemv_rope_store_epilogue_is_gemv_then_rotary_store(rows, q_heads, kv_heads, head_dim, k, block, config,
                                                            cache, dtype, poisoned_outputs) -> None:
    """q bit-equal, and the cache holding the same bytes at the tokens' slots, the other slots untouched."""
    config = CONFIGS[config]
    n = (q_heads + 2 * kv_heads) * head_dim
    w_q, w_s = quantized_weight(n, k, block, seed=rows + n)
    x = quantize_activation(randn(rows, k, dtype=dtype, seed=6, scale=2.0), ActivationQuant(128))
    rope = RotaryEmbedding(head_dim, 256, 10000.0).to(DEVICE)
    positions = torch.randint(0, 256, (rows,), generator=torch.Generator().manual_seed(rows)).to(DEVICE)
    slots = rows + 8
    loc = torch.randperm(slots, generator=torch.Generator().manual_seed(1))[:rows].to(DEVICE)
    cache_dtype = cache or dtype
    scales = (torch.tensor([0.5], device=DEVICE), torch.tensor([2.0], device=DEVICE)) if cache else (None, None)

    def target() -> KVStore:
        bufs = [torch.full((slots, kv_heads, head_dim), 3.0, device=DEVICE).to(cache_dtype) for _ in range(2)]
        return KVStore(*bufs, loc, *scales)

    qkv = fp8_gemv(x.q, x.scale, w_q, w_s, block, dtype, config)
    q, kv = qkv[:, : q_heads * head_dim], qkv[:, q_heads * head_dim:].view(rows, 2, kv_heads, head_dim)
    want = target()
    want_q, _ = fused_ops.apply_rotary(q.view(rows, q_heads, head_dim), kv[:, 0], positions, rope.cos_sin_cache,
                                       head_dim, kv[:, 1], want)
    got = target()
    got_q = fp8_gemv_rope_store(x.q, x.scale, w_q, w_s, q_heads, kv_heads, positions, rope.cos_sin_cache, got,
                                block, dtype, config)
    assert got_q.shape == (rows, q_heads * head_dim) and torch.equal(got_q, want_q.view(rows, -1))
    for got_buf, want_buf in ((got.k_buf, want.k_buf), (got.v_buf, want.v_buf)):
        assert torch.equal(got_buf.view(torch.uint8), want_buf.view(torch.uint8))
    untouched = torch.ones(slots, dtype=torch.bool)
    untouched[loc.cpu()] = False
    assert (got.k_buf[untouched.to(DEVICE)].float() == 3.0).all()
    assert not fp8_gemv_counters(DEVICE).any()


def test_gemv_rope_store_refuses_what_does_not_fit() -> None:
    assert rope_store_fits(6 * 128, 256, 128, torch.device(DEVICE))
    assert not rope_store_fits(6 * 96, 256, 96, torch.device(DEVICE))  # not a power of two
    assert not rope_store_fits(6 * 32, 256, 32, torch.device(DEVICE))  # heads narrower than a 64-row tile
    x_q = torch.zeros(1, 128, dtype=FP8_DTYPE, device=DEVICE)
    bufs = [torch.zeros(4, 1, 64, device=DEVICE) for _ in range(2)]
    args = (x_q, torch.ones(1, 1, device=DEVICE), torch.zeros(4 * 64, 128, dtype=FP8_DTYPE, device=DEVICE),
            torch.ones(4 * 64, device=DEVICE), 2, 1, torch.zeros(1, dtype=torch.long, device=DEVICE))
    table = torch.zeros(8, 64, device=DEVICE)
    with pytest.raises(ValueError, match="do not fit"):  # 3 q heads + 2 x 1 would be 5 heads
        fp8_gemv_rope_store(*args[:4], 3, 1, args[6], table, KVStore(*bufs, torch.zeros(1, dtype=torch.long), None,
                                                                     None))
    with pytest.raises(ValueError, match="K/V buffers"):  # two KV heads' rows, one-head buffers
        fp8_gemv_rope_store(*args[:4], 0, 2, args[6], table, KVStore(*bufs, torch.zeros(1, dtype=torch.long,
                                                                                        device=DEVICE), None, None))
