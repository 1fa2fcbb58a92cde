"""Batched heterogeneous LoRA (``radixlm.kernels.lora``, issue #22) on a GPU: the cost of shrink + expand next to
the base projection it rides on.

Shapes: Llama-3.1-8B's four LoRA-carrying linears, bf16 (qkv: K 4096 -> 4096 + 1024 + 1024, three slices;
gate_up: 4096 -> 2 x 14336, two slices; o: 4096 -> 4096; down: 14336 -> 4096).  Adapter pool: 16 slots of
``--max-rank`` (64) rows, random weights; every adapter of a row has the row's rank (16 or 64).

Rows: (shape, rank, tokens, adapters, layout).  Decode batches of 1 / 32 / 128 requests (one token each) and a
2048-token prefill (one request per adapter, 2048 / adapters tokens each); requests are spread evenly over 1, 4 or
16 distinct adapters (rows with more adapters than requests are skipped), interleaved in decode (request i runs
adapter i % adapters: the scheduler's rows do not come grouped).  Layouts:
``sorted``: the requests of one adapter share a segment (decode: ``build_segments(sort=True)``, the tokens
gathered through ``token_order``; prefill: one request per adapter), the dot form, in decode cut into pieces of ``DECODE_SPLIT`` tokens and padded with empty segments to the bound a CUDA graph of
that batch size captures (``cdiv(T, split) + adapters - 1``); ``per-req`` (decode only): one segment per request,
``max_seg_len`` 1 (the GEMV form, the other graph-friendly layout).

Columns (us, each op captured in a CUDA graph and its replay timed by ``triton.testing.do_bench``, which flushes
L2 before every replay, so weights come from HBM as in a step's back-to-back layers): ``base`` torch.matmul of
x [T, K] by the base weight (cuBLAS bf16), ``lora`` shrink + expand alone (``apply_lora``), ``base+lora`` both in
one graph, ``overhead`` (base+lora) / base - 1; ``rel err`` the LoRA delta against the torch references
(``lora_shrink_ref`` / ``lora_expand_ref`` on the same device, fp32 math), relative Frobenius, asserted < 1e-2
(bf16 rounding of y only).

    python bench/gpu/lora_kernels.py                          # all rows, ~2-3 minutes on an H200
    python bench/gpu/lora_kernels.py --shapes qkv --ranks 16 --tokens 128 --adapters 16   # a subset

from the repository root with ``PYTHONPATH=.``.  Without CUDA (``--scale 64``: every dimension divided by 64) it
runs the CPU path (the torch references) in float32 with wall-clock timing, to check the script only.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import NamedTuple

import torch

import triton
import triton.testing

from radixlm.kernels.lora import LoraSegments, apply_lora, build_segments, lora_expand_ref, lora_shrink_ref


class Shape(NamedTuple):
    k: int
    widths: tuple[int, ...]  # output slices


SHAPES = {
    "qkv": Shape(4096, (4096, 1024, 1024)),
    "gate_up": Shape(4096, (14336, 14336)),
    "o": Shape(4096, (4096,)),
    "down": Shape(14336, (4096,)),
}
TOKENS = (1, 32, 128, 2048)  # 2048: one prefill batch; the others decode batches
NUM_SLOTS = 16
DECODE_SPLIT = 16  # the dot form's smallest BLOCK_M


def time_us(fn: Callable[[], object]) -> float:
    """Median us of ``fn`` replayed as a CUDA graph, L2 flushed before each replay; wall clock without CUDA."""
    if not torch.cuda.is_available():
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e6
    fn()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=5, rep=25, return_mode="median") * 1e3


def layout(tokens: int, adapters: int, prefill: bool) -> tuple[list[int], list[int]]:
    """(slots, token counts) per request: decode requests of one token interleaved over ``adapters`` slots, or
    a prefill of ``tokens`` split into one request per adapter."""
    if prefill:
        return list(range(adapters)), [tokens // adapters] * adapters
    return [i % adapters for i in range(tokens)], [1] * tokens


class Operands(NamedTuple):
    x: torch.Tensor  # [tokens, K]
    w: torch.Tensor  # [N_total, K], the base weight
    a_pool: torch.Tensor
    b_pool: torch.Tensor
    ranks: torch.Tensor
    scalings: torch.Tensor
    offsets: torch.Tensor


def make_operands(shape: Shape, rank: int, max_rank: int, tokens: int, device: str) -> Operands:
    """Random x, base weight and a pool of ``NUM_SLOTS`` adapters of ``rank`` at ``max_rank`` (bf16 on a GPU)."""
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    n_total, num_slices = sum(shape.widths), len(shape.widths)
    x = torch.randn(tokens, shape.k, device=device, dtype=dtype, generator=gen)
    w = torch.randn(n_total, shape.k, device=device, dtype=dtype, generator=gen) / shape.k**0.5
    a_pool = torch.randn(NUM_SLOTS, num_slices * max_rank, shape.k, device=device, dtype=dtype,
                         generator=gen) / shape.k**0.5
    b_pool = torch.randn(NUM_SLOTS, n_total, max_rank, device=device, dtype=dtype, generator=gen) / rank**0.5
    ranks = torch.full((NUM_SLOTS,), rank, dtype=torch.int32, device=device)
    scalings = torch.full((NUM_SLOTS,), 2.0, dtype=torch.float32, device=device)
    offsets = torch.tensor([0] + [sum(shape.widths[:i + 1]) for i in range(num_slices)], dtype=torch.int32,
                           device=device)
    return Operands(x, w, a_pool, b_pool, ranks, scalings, offsets)


def row_segments(tokens: int, adapters: int, prefill: bool, per_request: bool, device: str) -> LoraSegments:
    """A row's layout (module docstring): prefill one merged segment per adapter, decode sorted pieces padded to
    a graph's bound, or one segment per request."""
    slots, counts = layout(tokens, adapters, prefill)
    if prefill or per_request:
        return build_segments(slots, counts, device, merge=not per_request)
    return build_segments(slots, counts, device, split=DECODE_SPLIT, sort=True,
                          num_segs=triton.cdiv(tokens, DECODE_SPLIT) + adapters - 1)


def run_row(shape: Shape, rank: int, max_rank: int, tokens: int, adapters: int, prefill: bool, per_request: bool,
            device: str) -> tuple[float, float, float, float]:
    """(base us, lora us, base+lora us, rel err of the LoRA delta) for one row."""
    x, w, a_pool, b_pool, ranks, scalings, offsets = make_operands(shape, rank, max_rank, tokens, device)
    n_total, num_slices = sum(shape.widths), len(shape.widths)
    seg = row_segments(tokens, adapters, prefill, per_request, device)
    dtype = x.dtype
    y = torch.empty(tokens, n_total, device=device, dtype=dtype)

    def base() -> None:
        torch.matmul(x, w.T, out=y)

    def lora() -> None:
        apply_lora(x, y, a_pool, b_pool, ranks, scalings, offsets, seg)

    def both() -> None:
        base()
        lora()

    base()
    y0 = y.to(torch.float32, copy=True)
    lora()
    delta = y.float() - y0
    y_ref = y0.clone()
    tmp = lora_shrink_ref(x, a_pool, seg.seg_starts, seg.seg_slots, ranks, num_slices, seg.token_order)
    lora_expand_ref(tmp, b_pool, seg.seg_starts, seg.seg_slots, ranks, scalings, offsets, y_ref, seg.token_order)
    ref_delta = y_ref - y0
    err = ((delta.double() - ref_delta.double()).norm() / ref_delta.double().norm()).item()
    assert err < 1e-2, f"rel err {err:.2e}"
    return time_us(base), time_us(lora), time_us(both), err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--ranks", nargs="+", type=int, default=[16, 64])
    parser.add_argument("--tokens", nargs="+", type=int, choices=TOKENS, default=list(TOKENS))
    parser.add_argument("--adapters", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--max-rank", type=int, default=64, help="the pool's rank (every rank must fit)")
    parser.add_argument("--scale", type=int, default=1, help="divide every dimension (a CPU check of the script)")
    args = parser.parse_args()
    if max(args.ranks) > args.max_rank:
        parser.error("every rank must fit in --max-rank")
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    name = torch.cuda.get_device_name() if cuda else "CPU (torch references; timings meaningless)"
    print(f"{name}  torch {torch.__version__}  triton {triton.__version__}  pool {NUM_SLOTS} slots, "
          f"max rank {args.max_rank}, {'bf16' if cuda else 'float32'}")
    print(f"{'shape':8s} {'rank':>4s} {'tokens':>6s} {'adapt':>5s} {'layout':>7s} {'base us':>8s} {'lora us':>8s} "
          f"{'base+lora':>9s} {'overhead':>8s} {'rel err':>8s}")
    start = time.perf_counter()
    for shape_name in args.shapes:
        shape = SHAPES[shape_name]
        shape = Shape(shape.k // args.scale, tuple(w // args.scale for w in shape.widths))
        for rank in args.ranks:
            for tokens in args.tokens:
                for adapters in args.adapters:
                    requests = adapters if tokens == 2048 else tokens
                    if adapters > requests:
                        continue
                    prefill = tokens == 2048
                    for per_request in ([False, True] if not prefill and tokens > 1 else [False]):
                        t_base, t_lora, t_both, err = run_row(
                            shape, rank, args.max_rank, tokens // args.scale if prefill else tokens, adapters,
                            prefill, per_request, device)
                        print(f"{shape_name:8s} {rank:4d} {tokens:6d} {adapters:5d} "
                              f"{'per-req' if per_request else 'sorted':>7s} {t_base:8.1f} {t_lora:8.1f} "
                              f"{t_both:9.1f} {t_both / t_base - 1:8.1%} {err:8.1e}", flush=True)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
