"""``l2_prefetch``: a hint that changes no result.  On CPU it launches nothing; on an sm_90 GPU, placed between a
producer and a consumer in a PDL chain (and in a CUDA graph), the consumer still sees the producer's output (the
prefetch kernel waits for the kernel before it before it exits)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from radixlm.kernels import l2_prefetch as l2  # noqa: E402
from radixlm.kernels.pdl import pdl_enabled  # noqa: E402

CUDA = torch.cuda.is_available()


def test_cpu_launches_nothing(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("launched on CPU")

    monkeypatch.setattr(l2, "_l2_prefetch_kernel", type("K", (), {"__getitem__": lambda self, grid: refuse})())
    l2.l2_prefetch(torch.zeros(100, 64, dtype=torch.bfloat16))
    l2.l2_prefetch(torch.zeros(100, 64, dtype=torch.bfloat16).t())  # no check either: nothing to do on CPU


@pytest.mark.skipif(not CUDA, reason="the bulk prefetch needs sm_90")
def test_refuses_what_it_cannot_prefetch() -> None:
    if not pdl_enabled(torch.device("cuda")):
        pytest.skip("PDL needs sm_90 and RADIXLM_DISABLE_PDL unset")
    w = torch.zeros(64, 64, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="contiguous"):
        l2.l2_prefetch(w.t())
    with pytest.raises(ValueError, match="aligned"):
        l2.l2_prefetch(w, 1024, offset=8)


@pytest.mark.skipif(not CUDA, reason="the bulk prefetch needs sm_90")
@pytest.mark.parametrize("nbytes,offset", [(None, 0), (1 << 20, 0), (3 * 4096 + 48, 4096 * 33 + 16), (8, 0)])
def test_chain_keeps_its_order(nbytes, offset) -> None:
    """RMSNorm (a PDL kernel) after a prefetch after the elementwise kernel writing its input: replayed in a CUDA
    graph on new inputs, and eagerly, the same output as without the prefetch, bit for bit."""
    if not pdl_enabled(torch.device("cuda")):
        pytest.skip("PDL needs sm_90 and RADIXLM_DISABLE_PDL unset")
    from radixlm.kernels.fused_ops import rms_norm

    gen = torch.Generator(device="cuda").manual_seed(3)
    weight = torch.randn(16 << 20, device="cuda", generator=gen).to(torch.float8_e4m3fn)  # 16 MB to prefetch
    x = torch.empty(4, 4096, dtype=torch.bfloat16, device="cuda")
    norm_w = torch.randn(4096, dtype=torch.bfloat16, device="cuda", generator=gen)

    def step(prefetch: bool) -> torch.Tensor:
        y = x * 3  # the producer
        if prefetch:
            l2.l2_prefetch(weight, nbytes, offset)
        return rms_norm(y, norm_w, 1e-6)

    x.normal_(generator=gen)
    step(True)  # compiled outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(True)
    for _ in range(5):
        x.normal_(generator=gen)
        graph.replay()
        expected = step(False)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        torch.testing.assert_close(step(True), expected, rtol=0, atol=0)
