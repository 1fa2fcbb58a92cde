"""``radixlm.kernels.gluon_gemv``: which decode GEMVs take the Gluon kernel, and on a Hopper GPU with Triton 3.6
that it computes the Triton GEMV's result.

On the GPU the comparison is bit for bit against ``fp8_gemv``'s Triton kernel at the same K split (which sums the
same per-tile products in the same order: each 128-wide K tile's FP8 dot from zero, scaled by its activation
group scale into an fp32 accumulator, the weight scale at the end, the splits' partials added in split order), and
within the FP8 dot's bound
(``FP8_DOT_REL``, as in ``test_fp8_kernels``) of the float64 product of the same quantized operands.  Elsewhere
(CPU CI, whose Triton is another release) only the dispatch rules run.
"""

from __future__ import annotations

import pytest
import torch

from radixlm.kernels import gluon_gemv

GPU = (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
       and gluon_gemv.gluon is not None)
FP8_DOT_REL = 1e-3  # the sm_90 FP8 dot's reduced-precision accumulation within a K tile (test_fp8_kernels)


@pytest.mark.parametrize("n, k, m, expected", [
    (4096, 4096, 1, True),  # Llama-3.1-8B o: 64 tiles on 132 SMs
    (6144, 4096, 1, True),  # qkv: 96 tiles
    (4096, 14336, 16, True),  # down, 16 tokens
    (28672, 4096, 1, True),  # gate_up: 448 tiles (WIDE_LAUNCH)
    (128256, 4096, 1, False),  # an FP8 LM head: 2,004 tiles, not measured
    (4096, 4096, 17, False),  # past the decode rows
    (4096, 4160, 1, False),  # K not whole activation groups
    (1024, 4096, 1, False),  # 16 tiles: a quarter of the SMs idle without a split
    (4096, 1024, 1, False),  # too short a K walk to amortize the ring
])
def test_which_shapes_take_the_gluon_kernel(n: int, k: int, m: int, expected: bool) -> None:
    assert gluon_gemv.applies(n, k, m, num_sms=132) is expected


def test_the_default_launch() -> None:
    assert tuple(gluon_gemv.Launch()) == (64, 4, 1, 4, 2)  # run S7's best at Llama-3.1-8B's qkv, o and down
    assert gluon_gemv.launch_for(4096, 14336, num_sms=132) == gluon_gemv.Launch()
    assert gluon_gemv.launch_for(28672, 4096, num_sms=132) == gluon_gemv.WIDE_LAUNCH == (128, 3, 1, 1, 2)


def test_cpu_tensors_keep_the_triton_kernel() -> None:
    x_q = torch.zeros(1, 4096, dtype=torch.float8_e4m3fn)
    assert not gluon_gemv.supported(x_q, torch.ones(1, 32), torch.zeros(4096, 4096, dtype=torch.float8_e4m3fn),
                                    torch.bfloat16, num_sms=132)


def _operands(m: int, n: int, k: int, seed: int):
    from radixlm.kernels.fp8_gemm import per_token_group_quant_fp8_triton

    gen = torch.Generator(device="cuda").manual_seed(seed)
    w = (torch.randn(n, k, generator=gen, device="cuda") * 100).clamp_(-448, 448).to(torch.float8_e4m3fn)
    w_s = (0.5 + torch.rand(n, generator=gen, device="cuda")) / (100 * k**0.5)
    x_q, x_s = per_token_group_quant_fp8_triton(torch.randn(m, k, generator=gen, device="cuda",
                                                            dtype=torch.bfloat16), 128)
    return x_q, x_s, w, w_s


@pytest.mark.skipif(not GPU, reason="the Gluon kernel needs sm_90 and Triton 3.6")
@pytest.mark.parametrize("n, k", [(4096, 4096), (6144, 4096), (4096, 14336), (4100, 4096), (3072, 2048),
                                  (28672, 4096)])
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("out_dtype, pdl", [(torch.bfloat16, True), (torch.float16, False)])
@pytest.mark.parametrize("launch", [gluon_gemv.Launch(), gluon_gemv.WIDE_LAUNCH, gluon_gemv.Launch(64, 3, 1, 8, 2),
                                    gluon_gemv.Launch(64, 6, 2, 1, 6)])
def test_gluon_gemv_equals_the_triton_kernel(n: int, k: int, m: int, out_dtype: torch.dtype, pdl: bool,
                                             launch) -> None:
    from radixlm.kernels.fp8_gemv import GemvConfig, fp8_gemv

    x_q, x_s, w, w_s = _operands(m, n, k, seed=n + k + m)
    out = gluon_gemv.gluon_fp8_gemv(x_q, x_s, w, w_s, out_dtype, pdl, launch)
    config = GemvConfig(64, 128, 4, 4, launch.split_k, 1)
    triton_out = fp8_gemv(x_q, x_s, w, w_s, None, out_dtype, config=config, pdl=pdl)
    assert torch.equal(out, triton_out)
    exact = (x_q.double() * x_s.double().repeat_interleave(128, 1)) @ (w.double() * w_s.double()[:, None]).t()
    rel = ((out.double() - exact).norm() / exact.norm()).item()
    assert rel < FP8_DOT_REL + 2 ** -8  # plus the 16-bit output's rounding


@pytest.mark.skipif(not GPU, reason="the Gluon kernel needs sm_90 and Triton 3.6")
def test_fp8_gemv_sends_narrow_decode_weights_to_gluon_and_replays_in_graphs(monkeypatch) -> None:
    from radixlm.kernels import fp8_gemv as module

    calls = []
    real = gluon_gemv.gluon_fp8_gemv
    monkeypatch.setattr(gluon_gemv, "gluon_fp8_gemv", lambda *a: calls.append(a[2].shape) or real(*a))
    x_q, x_s, w, w_s = _operands(1, 4096, 14336, seed=3)
    eager = module.fp8_gemv(x_q, x_s, w, w_s)
    narrow = _operands(1, 1024, 4096, seed=4)
    module.fp8_gemv(*narrow)
    assert calls == [(4096, 14336)]  # down took the Gluon kernel, 16 tiles the Triton one

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = module.fp8_gemv(x_q, x_s, w, w_s)
    new_x_q, new_x_s, _, _ = _operands(1, 4096, 14336, seed=5)
    x_q.copy_(new_x_q)
    x_s.copy_(new_x_s)
    graph.replay()
    assert torch.equal(replayed, module.fp8_gemv(x_q, x_s, w, w_s))
    assert not torch.equal(replayed, eager)


def test_launch_table_names_shapes_and_their_launches(tmp_path, monkeypatch) -> None:
    table = tmp_path / "launches.json"
    table.write_text('{"28672,4096": [64, 4, 1, 1, 2]}')
    monkeypatch.setenv("RADIXLM_GLUON_LAUNCHES", str(table))
    gluon_gemv.launch_overrides.cache_clear()
    try:
        assert gluon_gemv.launch_for(28672, 4096, num_sms=132) == gluon_gemv.Launch(64, 4, 1, 1, 2)
        assert gluon_gemv.launch_for(4096, 4096, num_sms=132) == gluon_gemv.Launch()
        assert gluon_gemv.applies(28672, 4096, 1, num_sms=16)  # listed: taken however many tiles it has
        assert not gluon_gemv.applies(28672, 4096, 17, num_sms=16)  # still decode rows only
    finally:
        monkeypatch.delenv("RADIXLM_GLUON_LAUNCHES")
        gluon_gemv.launch_overrides.cache_clear()
