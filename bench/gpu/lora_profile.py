"""Where a decode layer's LoRA time goes (issue #22): the four Llama-3.1-8B projections of one layer with their
adapters, captured in one CUDA graph, replayed under ``torch.profiler``; per kernel the mean device time per
replay, and the replay's wall time (kernels plus the gaps between them).

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

from radixlm.kernels.lora import decode_segments  # noqa: E402
from radixlm.kernels.lora_triton import lora_expand_triton, lora_shrink_triton  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", nargs="+", type=int, default=[128])
    parser.add_argument("--adapters", nargs="+", type=int, default=[16])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--modes", nargs="+", choices=["base", "seg", "overlap", "dense-gemm", "dense"],
                        default=["base", "seg", "overlap", "dense-gemm", "dense"])
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
                n_total = sum(shape.widths)
                w_ext = torch.cat([w, a_pool.reshape(-1, shape.k)])
                ops.append((x, w, a_pool, b_pool, ranks, scalings, offsets,
                            torch.empty(tokens, n_total, dtype=x.dtype, device="cuda"), w_ext,
                            torch.empty(tokens, w_ext.shape[0], dtype=x.dtype, device="cuda"),
                            torch.zeros(1, tokens, a_pool.shape[1], dtype=torch.float32, device="cuda")))
            slots = [i % adapters for i in range(tokens)]
            seg = decode_segments(slots, NUM_SLOTS, "cuda")

            side = torch.cuda.Stream()

            def run(mode: str) -> None:
                for x, w, a_pool, b_pool, ranks, scalings, offsets, y, w_ext, y_ext, tmp_zero in ops:
                    num_slices = offsets.shape[0] - 1
                    meta = (seg.seg_starts, seg.seg_slots, ranks)
                    if mode.startswith("dense"):
                        torch.matmul(x, w_ext.T, out=y_ext)
                        if mode == "dense":
                            lora_expand_triton(tmp_zero, b_pool, *meta, scalings, offsets, y_ext[:, :y.shape[1]],
                                               seg.max_seg_len, token_order=seg.token_order)
                        continue
                    if mode == "overlap":
                        main = torch.cuda.current_stream()
                        side.wait_stream(main)
                        with torch.cuda.stream(side):
                            tmp = lora_shrink_triton(x, a_pool, *meta, num_slices, seg.max_seg_len,
                                                     token_order=seg.token_order)
                    torch.matmul(x, w.T, out=y)
                    if mode == "overlap":
                        main.wait_stream(side)
                    if mode == "seg":
                        tmp = lora_shrink_triton(x, a_pool, *meta, num_slices, seg.max_seg_len,
                                                 token_order=seg.token_order)
                    if mode in ("seg", "overlap"):
                        lora_expand_triton(tmp, b_pool, *meta, scalings, offsets, y, seg.max_seg_len,
                                           token_order=seg.token_order)

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
