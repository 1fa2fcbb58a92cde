"""Decode LoRA without segments (issue #22): every row's shrink by every slot in one cuBLAS GEMM, then one Triton
expand whose K loop runs over the slots' rank chunks and masks each chunk's rows to those of its slot, against
the segmented shrink + expand (``apply_lora``) and the base projection.

Shapes as ``bench/gpu/lora_kernels.py`` (Llama-3.1-8B, bf16, a pool of 16 slots).  Rows of decode batches of 1 /
32 / 128 requests over 1 or 16 adapters (request i runs adapter i % adapters).  Columns (us, each op in its own
CUDA graph, L2 flushed before each replay): ``base``; ``seg``: the segmented path in the decode layout a CUDA
graph captures (``decode_segments``); ``dense``: shrink GEMM + dense expand over the present slots' chunks;
``dense-all``: the expand over every slot; ``shrink``/``expand``: the dense path's two launches alone;
``expand-BT``: the expand reading B stored transposed (N contiguous).  Then a
sweep of the dense expand's tiles, and a whole layer's four projections (base alone, base + seg, base + dense) in
one graph.

    python bench/gpu/lora_dense.py [--ranks 16 64] [--tokens 1 32 128] [--sweep] [--layer]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_kernels import NUM_SLOTS, SHAPES, make_operands, time_us  # noqa: E402

from radixlm.kernels.lora import apply_lora, decode_segments  # noqa: E402
from radixlm.kernels.lora_triton import lora_expand_dense_triton  # noqa: E402


def dense_inputs(slots: list[int], max_rank: int, rank: int, device: str, every_slot: bool = False):
    row_slots = torch.tensor(slots, dtype=torch.int32, device=device)
    present = range(NUM_SLOTS) if every_slot else sorted(set(s for s in slots if s >= 0))
    chunks = [s * max_rank + c * 16 for s in present for c in range(-(-rank // 16))]
    num = len(chunks)
    chunks += [0] * (NUM_SLOTS * max_rank // 16 - num)
    return row_slots, torch.tensor(chunks, dtype=torch.int32, device=device), torch.tensor([num], dtype=torch.int32,
                                                                                            device=device)


def row(shape_name: str, rank: int, max_rank: int, tokens: int, adapters: int, sweep: bool) -> None:
    shape = SHAPES[shape_name]
    x, w, a_pool, b_pool, ranks, scalings, offsets = make_operands(shape, rank, max_rank, tokens, "cuda")
    # Dense paths need zero padding beyond each slot's rank.
    a_pool.view(NUM_SLOTS, len(shape.widths), max_rank, -1)[:, :, rank:] = 0
    b_pool[:, :, rank:] = 0
    bt_view = b_pool.transpose(1, 2).contiguous().transpose(1, 2)  # [slots, N, max_rank], N contiguous
    n_total, num_slices = sum(shape.widths), len(shape.widths)
    slots = [i % adapters for i in range(tokens)]
    seg = decode_segments(slots, NUM_SLOTS, "cuda")
    row_slots, chunks, num_chunks = dense_inputs(slots, max_rank, rank, "cuda")
    _, all_chunks, num_all = dense_inputs(slots, max_rank, rank, "cuda", every_slot=True)
    a_all = a_pool.view(-1, shape.k)  # [slots * slices * max_rank, K]
    s = torch.empty(tokens, NUM_SLOTS * num_slices * max_rank, dtype=x.dtype, device="cuda")
    y = torch.empty(tokens, n_total, dtype=x.dtype, device="cuda")

    def base() -> None:
        torch.matmul(x, w.T, out=y)

    def seg_path() -> None:
        apply_lora(x, y, a_pool, b_pool, ranks, scalings, offsets, seg)

    def shrink() -> None:
        torch.matmul(x, a_all.T, out=s)

    def expand(all_slots: bool = False, transposed: bool = False, **kw) -> None:
        lora_expand_dense_triton(s.view(tokens, NUM_SLOTS, num_slices, max_rank), bt_view if transposed else b_pool,
                                 row_slots, scalings, offsets, y, all_chunks if all_slots else chunks,
                                 num_all if all_slots else num_chunks, **kw)

    def dense() -> None:
        shrink()
        expand()

    def dense_all() -> None:
        shrink()
        expand(True)

    base()
    y0 = y.float()
    seg_path()
    d_seg = y.float() - y0
    base()
    dense()
    d_dense = y.float() - y0
    err = ((d_dense - d_seg).norm() / d_seg.norm()).item()
    t = {name: time_us(fn) for name, fn in [("base", base), ("seg", seg_path), ("dense", dense),
                                            ("dense-all", dense_all), ("shrink", shrink), ("expand", expand),
                                            ("expand-BT", lambda: expand(transposed=True))]}
    print(f"{shape_name:8s} {rank:4d} {max_rank:4d} {tokens:6d} {adapters:5d} " +
          " ".join(f"{t[k]:9.1f}" for k in t) + f" {err:8.1e}", flush=True)
    if not sweep:
        return
    results = []
    for block_m in ([None] if tokens <= 64 else [64, 128]):
        for block_n in (64, 128, 256):
            for num_warps in (4, 8):
                for stages, transposed in itertools.product((2, 3), (False, True)):
                    kw = dict(block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=stages)
                    try:
                        results.append((time_us(lambda: expand(transposed=transposed, **kw)),
                                        dict(kw, bt=transposed)))
                    except Exception as exc:  # out of resources
                        print(f"  {kw}: {type(exc).__name__}", flush=True)
    results.sort(key=lambda r: r[0])
    print("  sweep best: " + "; ".join(f"{us:.1f} {kw}" for us, kw in results[:4]), flush=True)


def layer(rank: int, max_rank: int, tokens: int, adapters: int) -> None:
    """Base projections of a layer alone, with the segmented LoRA, with the dense LoRA (one graph each)."""
    ops = []
    for name in ("qkv", "o", "gate_up", "down"):
        shape = SHAPES[name]
        x, w, a_pool, b_pool, ranks, scalings, offsets = make_operands(shape, rank, max_rank, tokens, "cuda")
        a_pool.view(NUM_SLOTS, len(shape.widths), max_rank, -1)[:, :, rank:] = 0
        b_pool[:, :, rank:] = 0
        ops.append((shape, x, w, a_pool, b_pool, ranks, scalings, offsets,
                    torch.empty(tokens, sum(shape.widths), dtype=x.dtype, device="cuda"),
                    torch.empty(tokens, NUM_SLOTS * len(shape.widths) * max_rank, dtype=x.dtype, device="cuda")))
    slots = [i % adapters for i in range(tokens)]
    seg = decode_segments(slots, NUM_SLOTS, "cuda")
    row_slots, chunks, num_chunks = dense_inputs(slots, max_rank, rank, "cuda")

    def run(mode: str) -> None:
        for shape, x, w, a_pool, b_pool, ranks, scalings, offsets, y, s in ops:
            torch.matmul(x, w.T, out=y)
            if mode == "seg":
                apply_lora(x, y, a_pool, b_pool, ranks, scalings, offsets, seg)
            elif mode == "dense":
                torch.matmul(x, a_pool.view(-1, shape.k).T, out=s)
                lora_expand_dense_triton(s.view(tokens, NUM_SLOTS, len(shape.widths), max_rank), b_pool, row_slots,
                                         scalings, offsets, y, chunks, num_chunks)

    t = {m: time_us(lambda m=m: run(m)) for m in ("base", "seg", "dense")}
    print(f"layer    {rank:4d} {max_rank:4d} {tokens:6d} {adapters:5d} base {t['base']:.1f}  seg {t['seg']:.1f} "
          f"(+{t['seg'] / t['base'] - 1:.0%})  dense {t['dense']:.1f} (+{t['dense'] / t['base'] - 1:.0%})",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--ranks", nargs="+", type=int, default=[16, 64], help="rank = the pool's rank")
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 32, 128])
    parser.add_argument("--adapters", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--layer", action="store_true")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"{'shape':8s} {'rank':>4s} {'pool':>4s} {'tokens':>6s} {'adapt':>5s} {'base':>9s} {'seg':>9s} "
          f"{'dense':>9s} {'dense-all':>9s} {'shrink':>9s} {'expand':>9s} {'expand-BT':>9s} {'rel diff':>8s}")
    for rank in args.ranks:
        for shape_name in args.shapes:
            for tokens in args.tokens:
                for adapters in args.adapters:
                    if adapters <= tokens:
                        row(shape_name, rank, rank, tokens, adapters, args.sweep and rank == 16 and tokens in (1, 128)
                            and adapters == min(16, tokens) and shape_name in ("qkv", "gate_up"))
    if args.layer:
        for rank in args.ranks:
            for tokens in args.tokens:
                for adapters in args.adapters:
                    if adapters <= tokens:
                        layer(rank, rank, tokens, adapters)


if __name__ == "__main__":
    main()
