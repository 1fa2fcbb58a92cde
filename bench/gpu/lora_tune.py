"""Tile sweep of the LoRA shrink and expand kernels (``radixlm.kernels.lora_triton``) at Llama-3.1-8B shapes: for
each case, the default launch against the best of a grid of launch parameters, shrink and expand timed apart
(each in its own CUDA graph, L2 flushed before every replay, as ``bench/gpu/lora_kernels.py`` times them).

Grid: per shrink ``split_k``, the best ``block_k`` x ``num_warps`` of the shrink and the best ``block_n`` x
``num_warps`` of the expand over that shrink's output; the split with the
smallest sum wins.  Cases: the four projections at ranks 16 and 64 in a pool of 16
slots of rank 64: decode batches of 1 request (1 adapter), 32 and 128 requests (16 adapters interleaved, grouped
through ``token_order`` in pieces of 16) and a 2048-token prefill (16 requests, one per adapter).  Every best
configuration is checked against the torch reference (rel err < 1e-2).

    PYTHONPATH=. python bench/gpu/lora_tune.py                      # all cases, ~4 minutes on an H200
    PYTHONPATH=. python bench/gpu/lora_tune.py --shapes qkv --tokens 128 --ranks 16

``--dense``: the dense decode's expand (``lora_expand_dense_triton``, reading the shrink from the GEMM's tail;
gate_up with its SiLU-mul epilogue) on the decode layout the model runs (``decode_segments(dense=True)``, 16
slots): per case the default launch against ``DENSE_GRID`` (columns a tile, tiles a program, pipeline stages);
``--write-configs F`` writes the bests for ``RADIXLM_LORA_EXPAND_CONFIGS``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lora_kernels import SHAPES, make_operands, row_segments, time_us  # noqa: E402

from radixlm.kernels.launch_tables import write_launch_table  # noqa: E402
from radixlm.kernels.lora import decode_segments, lora_expand_ref, lora_shrink_ref  # noqa: E402
from radixlm.kernels.lora_triton import (  # noqa: E402
    expand_config, lora_expand_dense_silu_mul_triton, lora_expand_dense_triton, lora_expand_triton, lora_shrink_triton,
)

SPLITS = (1, 2, 4, 8, 16, 32)
BLOCK_KS = (64, 128, 256)
BLOCK_NS = (64, 128, 256, 512)
WARPS = (4, 8)


def sweep_case(shape_name: str, rank: int, tokens: int, adapters: int, max_rank: int) -> str:
    shape = SHAPES[shape_name]
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter, to check the script only
    x, _, a_pool, b_pool, ranks, scalings, offsets = make_operands(shape, rank, max_rank, tokens, device)
    dtype = x.dtype
    n_total, num_slices = sum(shape.widths), len(shape.widths)
    seg = row_segments(tokens, adapters, tokens > 128, False, device)
    y = torch.zeros(tokens, n_total, device=device, dtype=dtype)
    args = (seg.seg_starts, seg.seg_slots, ranks)

    def shrink(**kw):
        return lora_shrink_triton(x, a_pool, *args, num_slices, seg.max_seg_len, token_order=seg.token_order, **kw)

    def expand(tmp, **kw):
        lora_expand_triton(tmp, b_pool, *args, scalings, offsets, y, seg.max_seg_len, token_order=seg.token_order,
                           **kw)

    # Defaults, then per split count the best shrink and the best expand over its output (the shrink sums its
    # splits itself, so the expand's best does not depend on the split; it is timed per split all the same).
    shrink_default = time_us(shrink)
    tmp_default = shrink()
    expand_default = time_us(lambda: expand(tmp_default))
    best = (float("inf"), 0.0, {}, 0.0, {})  # (total, shrink us, shrink cfg, expand us, expand cfg)
    for split in SPLITS:
        if split > 1 and shape.k // split < 128:
            continue
        shrink_best = min(((time_us(lambda: shrink(**cfg)), cfg) for cfg in
                           (dict(split_k=split, block_k=bk, num_warps=w) for bk, w in itertools.product(BLOCK_KS, WARPS)
                            if bk * split <= 2 * shape.k)), key=lambda t: t[0])
        tmp_split = shrink(**shrink_best[1])
        expand_best = min(((time_us(lambda: expand(tmp_split, **cfg)), cfg) for cfg in
                           (dict(block_n=bn, num_warps=w) for bn, w in itertools.product(BLOCK_NS, WARPS))),
                          key=lambda t: t[0])
        if shrink_best[0] + expand_best[0] < best[0]:
            best = (shrink_best[0] + expand_best[0], *shrink_best, *expand_best)
    # the best pair against the torch reference
    y.zero_()
    expand(shrink(**best[2]), **best[4])
    ref = torch.zeros(tokens, n_total, device=device, dtype=torch.float32)
    tmp_ref = lora_shrink_ref(x, a_pool, *args, num_slices, seg.token_order)
    lora_expand_ref(tmp_ref, b_pool, *args, scalings, offsets, ref, seg.token_order)
    err = ((y.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err < 1e-2, f"rel err {err:.2e}"

    def fmt(cfg: dict) -> str:
        short = {"split_k": "sk", "block_k": "bk", "block_n": "bn", "num_warps": "warps"}
        return " ".join(f"{short[k]}={v}" for k, v in cfg.items()) or "default"

    return (f"{shape_name:<8} {rank:>4} {tokens:>6} {adapters:>4} | {shrink_default:7.1f} {expand_default:7.1f} "
            f"{shrink_default + expand_default:7.1f} | {best[1]:7.1f} {best[3]:7.1f} {best[0]:7.1f}  "
            f"{fmt(best[2])}; {fmt(best[4])}")


DENSE_GRID = [dict(block_n=bn, num_warps=4, n_tiles=nt, num_stages=st)
              for bn, nt, st in itertools.product((64, 128), (1, 2, 4, 8), (1, 2, 3))]


def sweep_dense(shape_name: str, rank: int, tokens: int, adapters: int, max_rank: int,
                table: dict[str, list[int]]) -> str:
    """The dense decode expand of one projection (gate_up: with the SiLU-mul epilogue, as the MLP runs it) per
    launch of ``DENSE_GRID``, each checked against the default's output; the best goes into ``table`` under
    ``RADIXLM_LORA_EXPAND_CONFIGS``'s key."""
    shape = SHAPES[shape_name]
    x, w, a_pool, b_pool, ranks, scalings, offsets = make_operands(shape, rank, max_rank, tokens, "cuda")
    n_total = sum(shape.widths)
    y_ext = x @ torch.cat([w, a_pool.reshape(-1, shape.k)]).T
    seg = decode_segments([i % adapters for i in range(tokens)], 16, "cuda", dense=True)
    silu = shape_name == "gate_up"
    out = torch.empty(tokens, n_total // 2 if silu else n_total, device="cuda", dtype=x.dtype)

    def expand(**kw) -> None:
        if silu:
            lora_expand_dense_silu_mul_triton(y_ext, out, b_pool, seg.seg_starts, seg.seg_slots, ranks, scalings,
                                              seg.max_seg_len, seg.token_order, **kw)
        else:
            lora_expand_dense_triton(y_ext, out, b_pool, seg.seg_starts, seg.seg_slots, ranks, scalings, offsets,
                                     seg.max_seg_len, seg.token_order, **kw)

    default_us = time_us(expand)
    expand()
    want = out.clone()
    results = []
    for cfg in DENSE_GRID:
        try:
            expand(**cfg)
            torch.testing.assert_close(out, want, rtol=1e-2, atol=1e-2)
            results.append((time_us(lambda: expand(**cfg)), cfg))
        except Exception as exc:  # out of resources, or a wrong result
            print(f"  {shape_name} {cfg}: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
    block_m = 1 if seg.max_seg_len <= 1 else 16
    results.append((default_us, expand_config(block_m, 1 if silu else len(shape.widths), silu)._asdict()))
    results.sort(key=lambda t: t[0])
    best_us, best_cfg = results[0]
    table[f"{'silu' if silu else 'dense'},{out.shape[1]},{block_m}"] = [
        best_cfg["block_n"], best_cfg["num_warps"], best_cfg["n_tiles"], best_cfg["num_stages"]]
    top = "  ".join(f"{c['block_n']}/{c['n_tiles']}/{c['num_stages']} {t:.1f}" for t, c in results[:4])
    return f"{shape_name:<8} {rank:>4} {tokens:>6} {adapters:>4} | {default_us:7.1f} {best_us:7.1f}  {top}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 32, 128, 2048])
    parser.add_argument("--max-rank", type=int, default=64)
    parser.add_argument("--dense", action="store_true")
    parser.add_argument("--write-configs", help="--dense: write each case's best launch here (JSON, for "
                        "RADIXLM_LORA_EXPAND_CONFIGS)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a GPU")
    if args.dense:
        print(f"{'shape':<8} {'rank':>4} {'tokens':>6} {'ad':>4} | {'default':>7} {'best':>7}  "
              f"top 4: block_n/n_tiles/stages us")
        table: dict[str, list[int]] = {}
        for shape_name, rank, tokens in itertools.product(args.shapes, args.ranks, args.tokens):
            print(sweep_dense(shape_name, rank, tokens, 1 if tokens == 1 else 16, args.max_rank, table), flush=True)
        if args.write_configs:
            write_launch_table(args.write_configs, table)
        return
    print(f"{'shape':<8} {'rank':>4} {'tokens':>6} {'ad':>4} | {'default: shrink':>15} {'expand':>7} {'sum':>7} | "
          f"{'best: shrink':>12} {'expand':>7} {'sum':>7}  configs (us)")
    for shape_name, rank, tokens in itertools.product(args.shapes, args.ranks, args.tokens):
        adapters = 1 if tokens == 1 else 16
        print(sweep_case(shape_name, rank, tokens, adapters, args.max_rank), flush=True)


if __name__ == "__main__":
    main()
