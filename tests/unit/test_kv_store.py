"""``kernels.kv_store.store_kv`` (the KV cache's store on CUDA) against the pool's torch store: K and V in one
launch, for FP8 caches (E4M3 and E5M2, scales other than 1 and different for K and V, values past the format's
range saturated, subnormals: the same bytes but for zero's sign, a tiny negative may be stored as +0 where torch
stores -0) and unquantized ones (the same values), K only (MLA's latent), strided sources (K and V as slices of a
fused QKV output) and scattered slots.  Without a GPU under Triton's interpreter."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported: decoration picks the mode

import pytest  # noqa: E402

from radixlm.kernels.kv_store import store_kv  # noqa: E402
from radixlm.mem import KVCacheSpec, create_kv_pool  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N, HEADS, DIM, V_DIM, SLOTS = 7, 2, 48, 40, 20


def fused_qkv(x_dtype: torch.dtype, spread: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q|k|v rows [N, HEADS * (2 * DIM + V_DIM)], k and v as strided [N, HEADS, dim] views of them, slots)."""
    gen = torch.Generator().manual_seed(3)
    width = HEADS * (2 * DIM + V_DIM)
    fused = torch.randn(N, width, generator=gen)
    if spread:  # magnitudes from E5M2's subnormals to past E4M3's and E5M2's maxima
        fused *= torch.logspace(-8, 5, width)[torch.randperm(width, generator=gen)]
    fused = fused.to(x_dtype)
    k = fused[:, HEADS * DIM: 2 * HEADS * DIM].view(N, HEADS, DIM)
    v = fused[:, 2 * HEADS * DIM:].view(N, HEADS, V_DIM)
    return k, v, torch.randperm(SLOTS, generator=gen)[:N]


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.37, 2.5)])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_fp8_store_matches_torch(dtype, scales, x_dtype) -> None:
    k, v, loc = fused_qkv(x_dtype, spread=True)
    pool = create_kv_pool(KVCacheSpec.mha(1, HEADS, DIM, dtype, v_head_dim=V_DIM), SLOTS, 1, "cpu")
    pool.set_kv_scales(0, *scales)
    pool.set_kv(0, loc, k, v)  # the torch store (CPU)
    bufs = [torch.zeros_like(b, device=DEVICE) for b in pool.get_kv_buffer(0)]
    store_kv(bufs[0], loc.to(DEVICE), k.to(DEVICE), bufs[1], v.to(DEVICE),
             *(torch.tensor([s], device=DEVICE) for s in scales))
    for stored, expected in zip(bufs, pool.get_kv_buffer(0)):
        stored = stored.cpu()
        assert torch.equal(stored.float(), expected.float())
        same_bytes = stored.view(torch.uint8) == expected.view(torch.uint8)
        assert (same_bytes | (expected.float() == 0)).all()
        assert (expected.float().abs() == torch.finfo(dtype).max).any()  # some saturated
        assert ((expected.float() != 0) & (expected.float().abs() < torch.finfo(dtype).tiny)).any()  # subnormal


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_plain_store_matches_torch(dtype) -> None:
    """An unquantized cache of the model's dtype: the rows copied as they are; other slots untouched."""
    k, v, loc = fused_qkv(dtype, spread=False)
    pool = create_kv_pool(KVCacheSpec.mha(1, HEADS, DIM, dtype, v_head_dim=V_DIM), SLOTS, 1, "cpu")
    pool.set_kv(0, loc, k, v)
    bufs = [torch.full_like(b, 7.0, device=DEVICE) for b in pool.get_kv_buffer(0)]
    store_kv(bufs[0], loc.to(DEVICE), k.to(DEVICE), bufs[1], v.to(DEVICE))
    untouched = torch.ones(SLOTS + 1, dtype=torch.bool)
    untouched[loc] = False
    for stored, expected in zip(bufs, pool.get_kv_buffer(0)):
        assert torch.equal(stored.cpu()[loc], expected[loc])
        assert (stored.cpu()[untouched] == 7.0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_latent_only(dtype) -> None:
    """MLA: one buffer, no V."""
    gen = torch.Generator().manual_seed(5)
    latent = torch.randn(N, 1, 576, generator=gen).bfloat16()
    loc = torch.randperm(SLOTS, generator=gen)[:N]
    pool = create_kv_pool(KVCacheSpec.mla(1, 512, 64, dtype), SLOTS, 1, "cpu")
    quant = dtype == torch.float8_e4m3fn
    if quant:
        pool.set_kv_scales(0, 0.5)
    pool.set_kv(0, loc, latent, None)
    buf = torch.zeros_like(pool.get_kv_buffer(0)[0], device=DEVICE)
    store_kv(buf, loc.to(DEVICE), latent.to(DEVICE), k_scale=torch.tensor([0.5], device=DEVICE) if quant else None)
    assert torch.equal(buf.cpu().float(), pool.get_kv_buffer(0)[0].float())


def test_argument_checks() -> None:
    buf = torch.zeros(4, 1, 8, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="needs its scales"):
        store_kv(buf, torch.tensor([1]), torch.ones(1, 1, 8))
    with pytest.raises(ValueError, match="one dtype"):
        store_kv(torch.zeros(4, 1, 8), torch.tensor([1]), torch.ones(1, 1, 8), torch.zeros(4, 1, 8).half(),
                 torch.ones(1, 1, 8))
