"""``kernels.kv_store.store_fp8`` (the FP8 cache's store on CUDA) against the pool's torch store: the same values
(the same bytes but for zero's sign: a tiny negative may be stored as +0 where torch stores -0), for E4M3 and E5M2, scales other than 1, values past the format's range (saturated), subnormals, a strided source
(K as a slice of a fused QKV output) and scattered slots.  Without a GPU under Triton's interpreter."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported: decoration picks the mode

import pytest  # noqa: E402

from radixlm.kernels.kv_store import store_fp8  # noqa: E402
from radixlm.mem import KVCacheSpec, create_kv_pool  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("scale", [1.0, 0.37])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_store_fp8_matches_torch(dtype, scale, x_dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    n, heads, dim, slots = 7, 2, 48, 20
    fused = torch.randn(n, 3 * heads * dim, generator=gen)
    # magnitudes from E5M2's subnormals to past E4M3's and E5M2's maxima
    fused *= torch.logspace(-8, 5, 3 * heads * dim)[torch.randperm(3 * heads * dim, generator=gen)]
    fused = fused.to(x_dtype)
    x = fused[:, heads * dim: 2 * heads * dim].view(n, heads, dim)  # a strided slice, as K of a QKV output
    loc = torch.randperm(slots, generator=gen)[:n]
    spec = KVCacheSpec.mha(1, heads, dim, dtype)
    pool = create_kv_pool(spec, slots, 1, "cpu")
    pool.set_kv_scales(0, scale, scale)
    pool.set_kv(0, loc, x, x)  # the torch store (CPU)
    expected = pool.get_kv_buffer(0)[0]
    buf = torch.zeros_like(expected, device=DEVICE)
    store_fp8(buf, loc.to(DEVICE), x.to(DEVICE), torch.tensor([scale], device=DEVICE))
    stored = buf.cpu()
    assert torch.equal(stored.float(), expected.float())
    same_bytes = stored.view(torch.uint8) == expected.view(torch.uint8)
    assert (same_bytes | (expected.float() == 0)).all()
    assert (expected.float().abs() == torch.finfo(dtype).max).any()  # some saturated
    assert ((expected.float() != 0) & (expected.float().abs() < torch.finfo(dtype).tiny)).any()  # some subnormal
