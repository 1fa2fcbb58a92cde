"""Where a decode layer's LoRA time goes (issue #22): the four Llama-3.1-8B projections of one layer with their
adapters, captured in one CUDA graph, replayed under ``torch.profiler``; per kernel the mean device time per
replay, and the replay's wall time (kernels plus the gaps between them).  Modes: ``base`` the base matmuls
alone; ``seg`` each followed by the shrink and expand launches (a pool apart from the weights: the prefill path,
and decode's before GPU run M4); ``dense`` decode's path (``lora_forward`` on a dense layout: one GEMM over the
weight with every slot's A rows below it, then the out-of-place expand, gate_up's with the SiLU-mul as epilogue).
Every mode includes gate_up's activation (``silu_and_mul`` after the projection, or the fused epilogue).  GPU runs M1-M3 also timed a shrink on a
side stream beside the base GEMM and a shrink+expand in one launch (docs/benchmarks.md; both dropped).

    python bench/gpu/lora_profile.py [--tokens 128] [--adapters 16] [--rank 16] [--modes base seg dense]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
import triton.testing
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_kernels import NUM_SLOTS, SHAPES, make_operands  # noqa: E402

from radixlm.kernels.fused_ops import silu_and_mul  # noqa: E402
from radixlm.kernels.lora import LoraWeights, decode_segments, lora_forward, lora_silu_mul_forward  # noqa: E402
from radixlm.kernels.lora_triton import lora_expand_triton, lora_shrink_triton  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", nargs="+", type=int, default=[128])
    parser.add_argument("--adapters", nargs="+", type=int, default=[16])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--modes", nargs="+", choices=["base", "seg", "dense"], default=["base", "seg", "dense"])
    args = parser.parse_args()
    rank = args.rank
    for tokens in args.tokens:
        for adapters in args.adapters:
            if adapters > tokens:
                continue
            ops = []
            for name in ("qkv", "o", "gate_up", "down"):
                shape = SHAPES[name]
                x, w, a_pool, b_pool, ranks, scalings, offsets = make_operands(shape, rank, rank, tokens, "cuda")
                w_ext = torch.cat([w, a_pool.reshape(-1, shape.k)])
                dense = LoraWeights(w_ext[w.shape[0]:].view(a_pool.shape), b_pool, ranks, scalings, offsets, w_ext)
                ops.append((x, w_ext[:w.shape[0]], a_pool, b_pool, ranks, scalings, offsets,
                            torch.empty(tokens, sum(shape.widths), dtype=x.dtype, device="cuda"), dense))
            slots = [i % adapters for i in range(tokens)]
            seg = decode_segments(slots, NUM_SLOTS, "cuda")
            dense_seg = decode_segments(slots, NUM_SLOTS, "cuda", dense=True)

            def run(mode: str) -> None:
                for x, w, a_pool, b_pool, ranks, scalings, offsets, y, dense in ops:
                    gate_up = offsets.shape[0] == 3
                    if mode == "dense":
                        if gate_up:
                            lora_silu_mul_forward(x, dense, dense_seg)
                        else:
                            lora_forward(x, lambda: x @ w.T, dense, dense_seg)
                        continue
                    torch.matmul(x, w.T, out=y)
                    if mode == "seg":
                        tmp = lora_shrink_triton(x, a_pool, seg.seg_starts, seg.seg_slots, ranks,
                                                 offsets.shape[0] - 1, seg.max_seg_len, token_order=seg.token_order)
                        lora_expand_triton(tmp, b_pool, seg.seg_starts, seg.seg_slots, ranks, scalings, offsets, y,
                                           seg.max_seg_len, token_order=seg.token_order)
                    if gate_up:
                        silu_and_mul(y)

            for mode in args.modes:
                run(mode)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    run(mode)
                wall = triton.testing.do_bench(graph.replay, warmup=5, rep=50, return_mode="median") * 1e3
                reps = 20
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(reps):
                        graph.replay()
                    torch.cuda.synchronize()
                per_kernel: dict[str, float] = defaultdict(float)
                count: dict[str, int] = defaultdict(int)
                for evt in prof.events():
                    if evt.device_type == torch.autograd.DeviceType.CUDA:
                        per_kernel[evt.name[:60]] += evt.device_time / reps
                        count[evt.name[:60]] += 1
                total = sum(per_kernel.values())
                print(f"tokens {tokens} adapters {adapters} rank {rank} {mode}: replay {wall:.1f} us (L2 flushed), "
                      f"kernels {total:.1f} us", flush=True)
                for name, us in sorted(per_kernel.items(), key=lambda kv: -kv[1]):
                    print(f"   {us:7.1f} us  x{count[name] // reps:<3d} {name}", flush=True)


if __name__ == "__main__":
    main()
