"""Decode attention over an FP8 KV cache against a bf16 one, on one GPU (issue #19): the Triton split-KV decode
kernel in CUDA graphs, bf16 queries, at Llama-3.1-8B (32 heads over 8 KV heads of 128) and DeepSeek-V2-Lite MLA
(16 heads over one 576-wide latent, V its first 512 dims) shapes, batch x context.  Per row: us per call for the
bf16 and the fp8_e4m3 cache, the speedup, and the KV bytes each reads per second (FP8 reads half the bytes; a
memory-bound kernel approaches 2x), and the relative difference of the two outputs (the cache's rounding: E4M3
keeps 3 mantissa bits, so a few 1e-2 on random normal K/V).  The largest row (Llama shape, 32 x 32k) holds 4 GB
of bf16 K/V plus its FP8 copy.

    python bench/gpu/fp8_kv.py                   (repository root; ~1 minute on an H200)
    python bench/gpu/fp8_kv.py --smoke           (CPU, Triton interpreter, tiny shapes: the script runs)
"""

from __future__ import annotations

import os
import sys

import torch

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repo

from radixlm.attention.triton_backend import TritonAttnBackend  # noqa: E402
from radixlm.kernels.decode_attention import decode_attention_fwd  # noqa: E402
from radixlm.mem import KVCacheSpec, create_kv_pool  # noqa: E402

DEVICE = "cpu" if SMOKE else "cuda"
# (name, num_heads, num_kv_heads, head_dim, v_head_dim, layout)
SHAPES = [("llama-8b", 32, 8, 128, 128, "mha"), ("v2-lite mla", 16, 1, 576, 512, "mla")]
BATCHES = [1, 8, 32] if not SMOKE else [2]
CONTEXTS = [8192, 32768] if not SMOKE else [40]


def graph_time_us(fn, iters: int = 20) -> float:
    """GPU time per call of ``fn`` replayed in a CUDA graph (NaN under --smoke)."""
    fn()
    if SMOKE:
        return float("nan")
    from triton.testing import do_bench

    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    return do_bench(graph.replay, warmup=5, rep=40, return_mode="median") / iters * 1e3


def run(shape: tuple, bs: int, context: int) -> None:
    name, heads, kv_heads, dk, dv, layout = shape
    tokens = bs * context
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    k = torch.randn((tokens, kv_heads, dk), generator=gen, device=DEVICE, dtype=torch.bfloat16)
    v = None if layout == "mla" else torch.randn((tokens, kv_heads, dv), generator=gen, device=DEVICE,
                                                 dtype=torch.bfloat16)
    table = torch.arange(1, tokens + 1, device=DEVICE, dtype=torch.int32).view(bs, context)
    rows = torch.arange(bs, device=DEVICE)
    seq_lens = torch.full((bs,), context, device=DEVICE)
    q = torch.randn((bs, heads, dk), generator=gen, device=DEVICE, dtype=torch.bfloat16)
    loc = torch.arange(1, tokens + 1, device=DEVICE)
    results = {}
    for dtype in (torch.bfloat16, torch.float8_e4m3fn):
        spec = (KVCacheSpec.mla(1, dv, dk - dv, dtype) if layout == "mla"
                else KVCacheSpec.mha(1, kv_heads, dk, dtype, v_head_dim=dv))
        pool = create_kv_pool(spec, tokens, 1, DEVICE)
        pool.set_kv(0, loc, k, v)
        # the backend's scratch and split plan for this batch, as a server with a 32k context would capture
        backend = TritonAttnBackend(heads, spec, bs, DEVICE, max_context_len=max(CONTEXTS))
        mid_o, mid_lse = backend.decode_scratch(bs)
        k_buf, v_buf = pool.get_kv_buffer(0)
        k_scale, v_scale = pool.get_kv_scales(0) or (None, None)
        o = torch.empty((bs, heads, dv), device=DEVICE, dtype=torch.bfloat16)

        def call() -> None:
            decode_attention_fwd(q, k_buf, v_buf, o, table, rows, seq_lens, mid_o, mid_lse, dk**-0.5,
                                 k_scale=k_scale, v_scale=v_scale)

        us = graph_time_us(call)
        kv_bytes = tokens * spec.bytes_per_token()
        results[dtype] = (us, kv_bytes / (us * 1e-6) / 1e9, o.float().clone(), mid_o.shape[2])
        del pool
    (t16, bw16, o16, splits), (t8, bw8, o8, _) = results[torch.bfloat16], results[torch.float8_e4m3fn]
    diff = ((o8 - o16).norm() / o16.norm()).item()
    print(f"{name:12s} {bs:5d} {context:7d} {splits:6d} {t16:10.1f} {t8:10.1f} {t16 / t8:7.2f}x "
          f"{bw16:8.0f} {bw8:8.0f} {diff:9.2e}")


def main() -> None:
    if not SMOKE:
        print(torch.cuda.get_device_name(), "torch", torch.__version__)
    print(f"{'shape':12s} {'batch':>5s} {'context':>7s} {'splits':>6s} {'bf16 us':>10s} {'fp8 us':>10s} "
          f"{'speedup':>8s} {'bf16 GB/s':>8s} {'fp8 GB/s':>8s} {'rel diff':>9s}")
    for shape in SHAPES:
        for bs in BATCHES:
            for context in CONTEXTS:
                run(shape, bs, context)


if __name__ == "__main__":
    main()
