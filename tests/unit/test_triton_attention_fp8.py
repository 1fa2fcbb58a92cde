"""The Triton attention kernels over an FP8 KV cache (``float8_e4m3fn`` / ``float8_e5m2`` with per-layer scales)
against the float64 reference over the *dequantized* cache: both sides see the same values, so the tolerance is
the unquantized one.  GQA (separate K and V) and MLA-like caches (V a view of the key rows, the kernels reusing the
K tile), K and V scales other than 1, and values past the format's range (saturated by the pool's store); then the
Triton backend over an FP8 pool against the torch-native one through the scheduler (tiny Llama and MLA models).

Without a GPU the kernels run under Triton's interpreter: small shapes, float32 queries (computed in fp32) and
fp16 ones (an FP8 cache's 16-bit compute path); on a GPU the same tests run compiled with bf16 queries too, plus
real sizes.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported: decoration picks the mode

import pytest

from radixlm.kernels.decode_attention import decode_attention_fwd, head_blocks, v_is_k_prefix
from radixlm.kernels.extend_attention import extend_attention_fwd
from radixlm.mem import KVCacheSpec, create_kv_pool
from radixlm.scheduler import Scheduler, run_to_completion
from conftest import build_tiny_hf_model, greedy_req, make_worker
from test_triton_attention import CUDA, DEVICE, kv_layout, rel_err
from test_triton_attention_modes import reference, seed

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
Q_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
# Same dequantized inputs on both sides: the unquantized tolerances.  16-bit queries compute in fp16 (the
# scaled queries and the probabilities round to 11 significant bits: measured 3e-4) and their outputs round to
# their dtype (bf16: 2^-9; bf16 queries run on the GPU only).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
SCALES = [(1.0, 1.0), (0.25, 3.0)]  # (k_scale, v_scale)


def fp8_kv(num_slots: int, num_kv_heads: int, dk: int, dv: int, dtype: torch.dtype, v_view: bool,
           scales: tuple[float, float], gen: torch.Generator, spread: float = 1.0):
    """An FP8 pool's layer 0 filled at every slot with ``spread``-wide normal values, stored through the pool
    (quantize, saturate).  ``v_view``: the MLA layout (V the first ``dv`` dims of the key rows, one scale).
    Returns (k_buf, v_buf, k_scale, v_scale, k_deq, v_deq): the stored buffers, the [1] scales and the float32
    values they stand for."""
    page = 1
    if v_view:
        spec = KVCacheSpec("mla", 1, num_kv_heads, dk, dv, dtype)
    else:
        spec = KVCacheSpec.mha(1, num_kv_heads, dk, dtype, v_head_dim=dv)
    pool = create_kv_pool(spec, num_slots - page, page, DEVICE)
    pool.set_kv_scales(0, *scales)
    loc = torch.arange(num_slots, device=DEVICE)
    k = torch.randn((num_slots, num_kv_heads, dk), generator=gen).to(DEVICE) * spread
    v = None if v_view else torch.randn((num_slots, num_kv_heads, dv), generator=gen).to(DEVICE) * spread
    pool.set_kv(0, loc, k, v)
    k_buf, v_buf = pool.get_kv_buffer(0)
    k_scale, v_scale = pool.get_kv_scales(0)
    return k_buf, v_buf, k_scale, v_scale, k_buf.float() * k_scale, v_buf.float() * v_scale


def run_decode(seq_lens: list[int], heads: tuple[int, int, int, int], kv_dtype: torch.dtype, q_dtype: torch.dtype,
               page_size: int, scales: tuple[float, float], v_view: bool = False, window: int | None = None,
               num_kv_splits: int = 4, spread: float = 1.0, tol: float | None = None) -> torch.Tensor:
    num_heads, num_kv_heads, dk, dv = heads
    gen = seed("fp8 decode", seq_lens, heads, kv_dtype, q_dtype, page_size, scales, v_view, window)
    table, rows, num_slots = kv_layout(seq_lens, page_size, gen)
    k_buf, v_buf, k_scale, v_scale, k_deq, v_deq = fp8_kv(num_slots, num_kv_heads, dk, dv, kv_dtype, v_view, scales,
                                                          gen, spread)
    assert v_is_k_prefix(k_buf, v_buf, *head_blocks(dk, dv)[:2]) == (v_view and dk != dv)
    bs = len(seq_lens)
    q = torch.randn((bs, num_heads, dk), generator=gen).to(DEVICE, q_dtype)
    o = torch.full((bs, num_heads, dv), float("nan"), device=DEVICE, dtype=q_dtype)
    mid_o = torch.full((bs, num_heads, num_kv_splits, dv), float("nan"), device=DEVICE)
    mid_lse = torch.full((bs, num_heads, num_kv_splits), float("nan"), device=DEVICE)
    sm_scale = dk**-0.5
    decode_attention_fwd(q, k_buf, v_buf, o, table, rows, torch.tensor(seq_lens, device=DEVICE), mid_o, mid_lse,
                         sm_scale, window, k_scale=k_scale, v_scale=v_scale)
    assert not o.isnan().any()
    for i, n in enumerate(seq_lens):
        slots = table[rows[i], :n].long()
        allowed = torch.ones((1, n), dtype=torch.bool)
        if window is not None:
            allowed[:, : max(n - window, 0)] = False
        ref = reference(q[i : i + 1], k_deq[slots], v_deq[slots], allowed.to(DEVICE), sm_scale)
        assert rel_err(o[i : i + 1], ref) < (tol or TOLERANCE[q_dtype]), f"request {i} (seq_len {n})"
    return o


def run_extend(reqs: list[tuple[int, int]], heads: tuple[int, int, int, int], kv_dtype: torch.dtype,
               q_dtype: torch.dtype, page_size: int, scales: tuple[float, float], v_view: bool = False,
               window: int | None = None) -> None:
    num_heads, num_kv_heads, dk, dv = heads
    gen = seed("fp8 extend", reqs, heads, kv_dtype, q_dtype, page_size, scales, v_view, window)
    table, rows, num_slots = kv_layout([p + e for p, e in reqs], page_size, gen)
    k_buf, v_buf, k_scale, v_scale, k_deq, v_deq = fp8_kv(num_slots, num_kv_heads, dk, dv, kv_dtype, v_view, scales,
                                                          gen)
    prefix_lens = torch.tensor([p for p, _ in reqs], device=DEVICE)
    extend_lens = torch.tensor([e for _, e in reqs], device=DEVICE)
    starts = torch.cumsum(extend_lens, 0) - extend_lens
    q = torch.randn((int(extend_lens.sum()), num_heads, dk), generator=gen).to(DEVICE, q_dtype)
    o = torch.full((q.shape[0], num_heads, dv), float("nan"), device=DEVICE, dtype=q_dtype)
    sm_scale = dk**-0.5
    extend_attention_fwd(q, k_buf, v_buf, o, table, rows, prefix_lens, extend_lens, starts, max(e for _, e in reqs),
                         sm_scale, window, k_scale=k_scale, v_scale=v_scale)
    assert not o.isnan().any()
    for i, (prefix, ext) in enumerate(reqs):
        slots = table[rows[i], : prefix + ext].long()
        q_pos = torch.arange(prefix, prefix + ext)[:, None]
        key_pos = torch.arange(prefix + ext)[None, :]
        allowed = key_pos <= q_pos
        if window is not None:
            allowed &= key_pos > q_pos - window
        start = int(starts[i])
        ref = reference(q[start : start + ext], k_deq[slots], v_deq[slots], allowed.to(DEVICE), sm_scale)
        assert rel_err(o[start : start + ext], ref) < TOLERANCE[q_dtype], f"request {i} (prefix {prefix}, new {ext})"


@pytest.mark.parametrize("kv_dtype", FP8)
@pytest.mark.parametrize("scales", SCALES)
@pytest.mark.parametrize("q_dtype", Q_DTYPES)
def test_decode_gqa(kv_dtype: torch.dtype, scales: tuple[float, float], q_dtype: torch.dtype) -> None:
    # groups of 4 over 2 KV heads; 1 key, a partial block, two blocks over the splits
    run_decode([1, 17, 70], (8, 2, 64, 64), kv_dtype, q_dtype, 16, scales)


@pytest.mark.parametrize("kv_dtype", FP8)
@pytest.mark.parametrize("q_dtype", Q_DTYPES)
def test_decode_mla_view(kv_dtype: torch.dtype, q_dtype: torch.dtype) -> None:
    # one latent KV head, V its first 64 dims (the kernel reuses the K tile), keys 96 = 64 + 32 wide
    run_decode([1, 37, 80], (16, 1, 96, 64), kv_dtype, q_dtype, 1, (0.5, 0.5), v_view=True)


def test_decode_window_and_group_of_three() -> None:
    run_decode([5, 40], (9, 3, 32, 32), torch.float8_e4m3fn, torch.float32, 4, (2.0, 0.125), window=7)


@pytest.mark.parametrize("kv_dtype", FP8)
@pytest.mark.parametrize("q_dtype", Q_DTYPES)
def test_extend_gqa(kv_dtype: torch.dtype, q_dtype: torch.dtype) -> None:
    run_extend([(0, 20), (13, 9), (30, 1)], (8, 2, 64, 64), kv_dtype, q_dtype, 4, (0.25, 3.0))


@pytest.mark.parametrize("kv_dtype", FP8)
def test_extend_mla_view(kv_dtype: torch.dtype) -> None:
    run_extend([(0, 9), (20, 12)], (4, 1, 96, 64), kv_dtype, torch.float32, 1, (0.5, 0.5), v_view=True, window=10)


@pytest.mark.parametrize("kv_dtype", FP8)
def test_store_saturates(kv_dtype: torch.dtype) -> None:
    """Values past the format's range (and inf) are stored as its largest finite value times the scale, never
    inf or NaN; in-range values round to the nearest FP8 value."""
    limit = torch.finfo(kv_dtype).max
    pool = create_kv_pool(KVCacheSpec.mha(1, 1, 4, kv_dtype), 4, 1, DEVICE)
    pool.set_kv_scales(0, 2.0, 0.5)
    k = torch.tensor([[[1e9, -1e9, float("inf"), 3.0]]], device=DEVICE)
    v = torch.tensor([[[limit, -float("inf"), 0.0, -1.5]]], device=DEVICE)
    pool.set_kv(0, torch.tensor([2], device=DEVICE), k, v)
    k_buf, v_buf = (buf.float() for buf in pool.get_kv_buffer(0))
    assert k_buf[2, 0].tolist() == [limit, -limit, limit, 1.5]
    assert v_buf[2, 0].tolist() == [limit, -limit, 0.0, -3.0]  # limit / 0.5 saturates too
    assert k_buf[[0, 1, 3, 4]].abs().sum() == 0 and v_buf[[0, 1, 3, 4]].abs().sum() == 0  # other slots untouched


def test_saturated_cache_attends_finite() -> None:
    # K and V drawn 1000x past E4M3's range: most of the cache saturates at +-448 * scale; the kernels see the
    # same clamped values as the reference and stay finite.  Logits reach ~1e5, whose float32 rounding (~1e-2 in
    # absolute terms) moves the softmax weights by ~1e-5 relative: a looser tolerance than for normal logits.
    o = run_decode([33], (4, 2, 32, 32), torch.float8_e4m3fn, torch.float32, 1, (1.0, 1.0), spread=1e3 * 448,
                   tol=1e-3)
    assert o.isfinite().all()


# ---------------------------------------------------------------- through the scheduler


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    paths = {}
    for name in ("llama", "deepseek_v2"):
        path = tmp_path_factory.mktemp(name)
        build_tiny_hf_model(name, str(path))
        paths[name] = str(path)
    return paths


def triton_vs_native_outputs(model_path: str, backend: str) -> tuple[list[list[int]], list[int]]:
    """Greedy outputs and cached tokens over an FP8 cache with scales 0.5 (K; MLA: the latent) and 2 (V): a first
    request, then three sharing its first 24 tokens (extend over a cached prefix, then decode)."""
    worker = make_worker(model_path, kv_cache_dtype="fp8_e4m3", attention_backend=backend, max_total_tokens=1024,
                         device=DEVICE)
    pool = worker.runner.kv_pool
    for layer in range(pool.spec.num_layers):
        pool.set_kv_scales(layer, 0.5, 2.0)
    sched = Scheduler(worker.runner.server_args, worker)
    shared = list(range(100, 124))
    reqs = [greedy_req(str(i), ids, 4) for i, ids in enumerate(
        [shared + [7, 8, 9], shared + [11] * 5, shared + [300, 301], shared[:20] + [42]])]
    run_to_completion(sched, reqs[:1])
    run_to_completion(sched, reqs[1:])
    return [r.output_ids for r in reqs], [r.cached_tokens for r in reqs]


@pytest.mark.parametrize("model", ["llama", "deepseek_v2"])
def test_triton_backend_matches_torch_native_fp8(tiny_models: dict[str, str], model: str) -> None:
    # The Triton backend passes the pool's per-layer scales to both kernels (under the interpreter on CPU); MLA:
    # the latent's one scale, V read from the key tile.
    outs, cached = triton_vs_native_outputs(tiny_models[model], "triton")
    assert cached[1] > 0
    assert (outs, cached) == triton_vs_native_outputs(tiny_models[model], "torch_native")


@pytest.mark.skipif(not CUDA, reason="GPU-sized shapes are too slow for the interpreter")
def test_gpu_sizes() -> None:
    for kv_dtype in FP8:
        # Llama-3-8B per rank: 32 heads over 8 KV heads of 128, long contexts over 8 splits
        run_decode([6000, 4097, 333, 2], (32, 8, 128, 128), kv_dtype, torch.bfloat16, 16, (0.5, 2.0), num_kv_splits=8)
        run_extend([(0, 2048), (3000, 517), (4096, 1)], (32, 8, 128, 128), kv_dtype, torch.bfloat16, 16, (0.5, 2.0))
        # DeepSeek MLA: 576-wide latent keys, V its first 512 dims, 16 and 128 heads
        run_decode([20000, 7], (16, 1, 576, 512), kv_dtype, torch.bfloat16, 16, (0.5, 0.5), v_view=True,
                   num_kv_splits=64)
        run_decode([3000, 1000], (128, 1, 576, 512), kv_dtype, torch.bfloat16, 16, (0.5, 0.5), v_view=True,
                   num_kv_splits=8)
        run_extend([(3000, 64), (0, 500)], (16, 1, 576, 512), kv_dtype, torch.bfloat16, 16, (0.5, 0.5),
                   v_view=True)
