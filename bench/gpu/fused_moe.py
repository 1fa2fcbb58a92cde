"""The fused MoE kernel (``radixlm.kernels.fused_moe``) on a GPU: correctness at real shapes, timing, tuning.

Shapes (one layer's routed experts, bf16, uniform random top-k distinct experts per token):
DeepSeek-V2-Lite, Qwen3-30B-A3B, Mixtral-8x7B, DeepSeek-V3 at TP1; num_tokens 1 .. 4096.

Default mode:
1. correctness: the Triton path against the grouped torch path (``fused_experts_torch``, bf16, one F.linear
   chain per used expert) at every shape, relative Frobenius error printed and asserted below 2e-2;
2. timing (``triton.testing.do_bench`` medians, L2 flushed), one row per (shape, num_tokens):
   ``triton us`` the whole ``fused_experts`` call (alignment, two GEMMs, top-k sum) with its host launch
   overhead, and its TFLOP/s of useful FLOPs (2 * num_tokens * top_k * 3 * hidden * inter); ``graph us`` the
   same call replayed as a CUDA graph (what a captured decode step pays; also proves the path is capturable);
   ``loop us``/``TF/s`` the per-expert torch loop; ``dense TF/s`` one bf16 GEMM of the same FLOPs
   ([num_tokens * top_k, hidden] x [hidden, 3 * inter]), the ceiling for a grouped GEMM; ``TB/s`` the weight
   bytes of the experts actually hit over the graph time, the roofline of memory-bound decode rows.

3. alignment: the single-program Triton kernel vs the torch ops (CUDA-graph us, and whether they agree), to
   set ``moe_align._KERNEL_MAX_PAIRS`` (where ``align_pairs_by_expert`` switches from the first to the second);
4. routing: DeepSeek-V3's grouped top-k (256 experts, 8 groups, keep 4, top-8) as the Triton kernel vs the
   torch code, ids compared, both timed eager and as CUDA graphs.

``--tune``: for every (shape, num_tokens), every config of a small grid (``tune_grid``) timed as a CUDA graph;
prints the best config per row and a summary by pairs per expert, from which ``default_config`` can be updated.

``--fp8``: block-FP8 experts (issue #19; the bf16 experts quantized in 128x128 blocks, as DeepSeek-V3's
checkpoint stores them, activations quantized per token per 128 channels by the kernel path) against the same
bf16 experts: relative error of the fp8 output vs the bf16 one (four E4M3 roundings: hidden, w13, the activation
and w2, each ~3.6 % rms relative; 6.3 % measured by the CPU path at smaller random shapes; asserted < 0.1),
CUDA-graph us and TF/s of both, the speedup, and ``TB/s`` the fp8 weight + scale bytes of the experts hit over
the fp8 time.  With ``--tune``, the sweep times the fp8 kernel instead.

    python bench/gpu/fused_moe.py            # ~2-3 minutes on an H200 (Triton compiles included)
    python bench/gpu/fused_moe.py --tune     # ~5-6 minutes
    python bench/gpu/fused_moe.py --shapes qwen3-30b-a3b --tokens 1 64   # a subset
    python bench/gpu/fused_moe.py --fp8 --shapes deepseek-v3-tp1         # ~2-3 minutes
    python bench/gpu/fused_moe.py --fp8 --tune --shapes deepseek-v3-tp1  # ~5-6 minutes

from the repository root with ``PYTHONPATH=.``.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
import triton.testing

from radixlm.kernels.fused_moe import fused_experts, fused_experts_torch
from radixlm.kernels.moe_align import align_pairs_torch, align_pairs_triton
from radixlm.kernels.moe_gemm import GemmConfig, default_config, fused_experts_triton
from radixlm.kernels.moe_routing import grouped_topk_sigmoid
from radixlm.layers.fp8_moe import quantize_experts
from radixlm.layers.moe_router import Routing, select_experts_torch


class Shape(NamedTuple):
    num_experts: int
    hidden: int
    inter: int
    top_k: int


SHAPES = {
    "deepseek-v2-lite": Shape(64, 2048, 1408, 6),
    "qwen3-30b-a3b": Shape(128, 2048, 768, 8),
    "mixtral-8x7b": Shape(8, 4096, 14336, 2),
    "deepseek-v3-tp1": Shape(256, 7168, 2048, 8),
}
TOKENS = (1, 8, 64, 256, 1024, 4096)
DTYPE = torch.bfloat16
FP8_BLOCK = (128, 128)


class Case(NamedTuple):
    x: torch.Tensor  # [num_tokens, hidden]
    w13: torch.Tensor  # [E, 2 * inter, hidden]
    w2: torch.Tensor  # [E, hidden, inter]
    weights: torch.Tensor  # [num_tokens, top_k] fp32
    ids: torch.Tensor  # [num_tokens, top_k] int32


def make_weights(shape: Shape, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    e, h, i = shape.num_experts, shape.hidden, shape.inter
    w13 = torch.randn(e, 2 * i, h, generator=gen, device="cuda", dtype=DTYPE).mul_(h**-0.5)
    w2 = torch.randn(e, h, i, generator=gen, device="cuda", dtype=DTYPE).mul_(i**-0.5)
    return w13, w2


def make_case(shape: Shape, w13: torch.Tensor, w2: torch.Tensor, num_tokens: int, gen: torch.Generator) -> Case:
    x = torch.randn(num_tokens, shape.hidden, generator=gen, device="cuda", dtype=DTYPE)
    # uniform random top-k distinct experts: the k largest of uniform scores
    ids = torch.rand(num_tokens, shape.num_experts, generator=gen, device="cuda").topk(shape.top_k, dim=1).indices
    weights = torch.rand(num_tokens, shape.top_k, generator=gen, device="cuda").softmax(dim=1)
    return Case(x, w13, w2, weights, ids.to(torch.int32))


class Fp8Experts(NamedTuple):
    w13: torch.Tensor  # [E, 2 * inter, hidden] float8_e4m3fn
    w2: torch.Tensor  # [E, hidden, inter] float8_e4m3fn
    w13_scale: torch.Tensor  # [E, 2 * inter / 128, hidden / 128] float32
    w2_scale: torch.Tensor  # [E, hidden / 128, inter / 128] float32

    def __call__(self, case: Case, config: GemmConfig | None = None) -> torch.Tensor:
        """The fused MoE of ``case``'s tokens and routing over these experts (the Triton path)."""
        return fused_experts_triton(case.x, self.w13, self.w2, case.weights, case.ids, config=config,
                                    w13_scale=self.w13_scale, w2_scale=self.w2_scale, block_shape=FP8_BLOCK)

    def bytes_hit(self, case: Case) -> float:
        """Weight and scale bytes of the experts ``case`` routes to."""
        per_expert = sum(t[0].numel() * t.element_size() for t in self)
        return case.ids.unique().numel() * per_expert


def quantize_case_experts(w13: torch.Tensor, w2: torch.Tensor) -> Fp8Experts:
    (w13_q, w13_s), (w2_q, w2_s) = quantize_experts(w13, FP8_BLOCK), quantize_experts(w2, FP8_BLOCK)
    return Fp8Experts(w13_q, w2_q, w13_s, w2_s)


def useful_flops(shape: Shape, num_tokens: int) -> float:
    return 2.0 * num_tokens * shape.top_k * 3 * shape.hidden * shape.inter


def weight_bytes_hit(case: Case, shape: Shape) -> float:
    experts_hit = case.ids.unique().numel()
    return experts_hit * 3 * shape.hidden * shape.inter * case.w13.element_size()


def bench_us(fn: Callable[[], object], rep_ms: int = 50) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=rep_ms) * 1e3


def graph_us(fn: Callable[[], object], rep_ms: int = 50) -> float:
    """Median of CUDA-graph replays of ``fn`` (captured on a side stream by do_bench_cudagraph; L2 not
    flushed)."""
    return triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median") * 1e3


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def check(names: list[str], tokens: list[int]) -> None:
    print("correctness: Triton vs the grouped torch loop (bf16), relative Frobenius error")
    gen = torch.Generator(device="cuda").manual_seed(0)
    worst = 0.0
    for name in names:
        shape = SHAPES[name]
        w13, w2 = make_weights(shape, gen)
        errs = []
        for num_tokens in tokens:
            case = make_case(shape, w13, w2, num_tokens, gen)
            err = rel_err(fused_experts(*case), fused_experts_torch(*case))
            errs.append(f"{num_tokens}: {err:.1e}")
            worst = max(worst, err)
        print(f"  {name:18s} " + "  ".join(errs))
        del w13, w2, case  # the case holds the weights too
        torch.cuda.empty_cache()
    assert worst < 2e-2, f"relative error {worst:.3e} vs the torch loop"
    print(f"  worst {worst:.2e} (< 2e-2: ok)")


def timing(names: list[str], tokens: list[int]) -> None:
    header = (f"{'shape':18s} {'tokens':>6s} {'triton us':>10s} {'graph us':>9s} {'TF/s':>6s} {'loop us':>9s} "
              f"{'TF/s':>6s} {'dense TF/s':>10s} {'TB/s':>6s} {'config':s}")
    print("\ntiming (bf16; TF/s of the useful FLOPs; TB/s: weight bytes of the experts hit / graph us)")
    print(header)
    gen = torch.Generator(device="cuda").manual_seed(1)
    for name in names:
        shape = SHAPES[name]
        w13, w2 = make_weights(shape, gen)
        for num_tokens in tokens:
            case = make_case(shape, w13, w2, num_tokens, gen)
            flops = useful_flops(shape, num_tokens)
            t_triton = bench_us(lambda: fused_experts(*case))
            try:
                t_graph = graph_us(lambda: fused_experts(*case))
            except RuntimeError as exc:  # report and go on: the other rows still say something
                print(f"  CUDA-graph capture failed: {exc}")
                t_graph = float("nan")
            t_loop = bench_us(lambda: fused_experts_torch(*case), rep_ms=30)
            a = torch.randn(num_tokens * shape.top_k, shape.hidden, device="cuda", dtype=DTYPE)
            b = torch.randn(shape.hidden, 3 * shape.inter, device="cuda", dtype=DTYPE)
            t_dense = bench_us(lambda: torch.mm(a, b))
            del a, b
            config = default_config(num_tokens * shape.top_k, shape.num_experts)
            print(f"{name:18s} {num_tokens:6d} {t_triton:10.1f} {t_graph:9.1f} {flops / t_triton / 1e6:6.1f} "
                  f"{t_loop:9.1f} {flops / t_loop / 1e6:6.1f} {flops / t_dense / 1e6:10.1f} "
                  f"{weight_bytes_hit(case, shape) / t_graph / 1e6:6.2f} "
                  f"m{config.block_m} n{config.block_n} k{config.block_k} w{config.num_warps} s{config.num_stages}")
        del w13, w2, case  # the case holds the weights too
        torch.cuda.empty_cache()


def fp8_timing(names: list[str], tokens: list[int]) -> None:
    print("\nblock-FP8 experts (128x128 weight blocks, per-token-group activations) vs the same experts in bf16: "
          "CUDA-graph us, TF/s of the useful FLOPs, TB/s of the fp8 weight + scale bytes of the experts hit")
    print(f"{'shape':18s} {'tokens':>6s} {'rel err':>8s} {'fp8 us':>8s} {'TF/s':>6s} {'bf16 us':>8s} {'TF/s':>6s} "
          f"{'speedup':>7s} {'TB/s':>6s}")
    gen = torch.Generator(device="cuda").manual_seed(5)
    worst = 0.0
    for name in names:
        shape = SHAPES[name]
        w13, w2 = make_weights(shape, gen)
        fp8 = quantize_case_experts(w13, w2)
        for num_tokens in tokens:
            case = make_case(shape, w13, w2, num_tokens, gen)
            err = rel_err(fp8(case), fused_experts(*case))
            worst = max(worst, err)
            t_fp8, t_bf16 = graph_us(lambda: fp8(case)), graph_us(lambda: fused_experts(*case))
            flops = useful_flops(shape, num_tokens)
            print(f"{name:18s} {num_tokens:6d} {err:8.1e} {t_fp8:8.1f} {flops / t_fp8 / 1e6:6.1f} {t_bf16:8.1f} "
                  f"{flops / t_bf16 / 1e6:6.1f} {t_bf16 / t_fp8:6.2f}x {fp8.bytes_hit(case) / t_fp8 / 1e6:6.2f}",
                  flush=True)
        del w13, w2, fp8, case  # the case holds the weights too
        torch.cuda.empty_cache()
    assert worst < 0.1, f"fp8 vs bf16 relative error {worst:.3e}"
    print(f"  worst relative error {worst:.2e} (< 0.1: ok)")


def alignment(names: list[str], tokens: list[int]) -> None:
    print("\nalignment, CUDA-graph us: the single-program Triton kernel vs torch ops (block_m of default_config)")
    print(f"{'shape':18s} {'tokens':>6s} {'pairs':>6s} {'block_m':>7s} {'triton':>8s} {'torch':>8s} {'equal':>5s}")
    gen = torch.Generator(device="cuda").manual_seed(4)
    for name in names:
        shape = SHAPES[name]
        for num_tokens in tokens:
            ids = torch.rand(num_tokens, shape.num_experts, generator=gen, device="cuda").topk(shape.top_k).indices
            block_m = default_config(ids.numel(), shape.num_experts).block_m
            results = [align(ids, shape.num_experts, block_m) for align in (align_pairs_triton, align_pairs_torch)]
            equal = all(torch.equal(a, b) for a, b in zip(*results))
            times = [graph_us(lambda align=align: align(ids, shape.num_experts, block_m), rep_ms=10)
                     for align in (align_pairs_triton, align_pairs_torch)]
            print(f"{name:18s} {num_tokens:6d} {ids.numel():6d} {block_m:7d} {times[0]:8.1f} {times[1]:8.1f} "
                  f"{str(equal):>5s}")


def routing(tokens: list[int]) -> None:
    print("\nDeepSeek-V3 grouped top-k routing (E=256, 8 groups, keep 4, top-8): Triton vs torch, us")
    print(f"{'tokens':>6s} {'triton':>8s} {'graph':>8s} {'torch':>8s} {'graph':>8s} {'ids equal':>9s}")
    gen = torch.Generator(device="cuda").manual_seed(3)
    bias = 0.1 * torch.randn(256, generator=gen, device="cuda")
    for num_tokens in tokens:
        logits = torch.randn(num_tokens, 256, generator=gen, device="cuda")
        args = (logits, bias, 8, 8, 4, 2.5, True)
        v3 = Routing(num_experts=256, top_k=8, scoring="sigmoid", renormalize=True, num_groups=8, topk_groups=4,
                     group_score="top2_sum", scaling_factor=2.5, correction_bias=True)
        weights, ids = grouped_topk_sigmoid(*args)
        ref_weights, ref_ids = select_experts_torch(logits, v3, bias)
        same = (ids == ref_ids).all(dim=1).float().mean().item()  # a near-tie may order two experts differently
        assert same > 0.99 and rel_err(weights, ref_weights) < 1e-3, (same, rel_err(weights, ref_weights))
        kernels = (lambda: grouped_topk_sigmoid(*args), lambda: select_experts_torch(logits, v3, bias))
        times = [f(fn) for fn in kernels for f in (bench_us, graph_us)]
        print(f"{num_tokens:6d} " + " ".join(f"{t:8.1f}" for t in times) + f" {same:9.3f}")


def tune_grid(pairs_per_expert: float) -> list[GemmConfig]:
    """Configs worth trying at this many pairs per expert (block_m near it; ~24 each, mostly shared, so few
    compiles)."""
    if pairs_per_expert <= 16:
        block_ms = (16, 32)
    elif pairs_per_expert <= 64:
        block_ms = (16, 32, 64)
    elif pairs_per_expert <= 256:
        block_ms = (32, 64, 128)
    else:
        block_ms = (64, 128)
    grid = []
    for block_m, block_n, block_k, (warps, stages) in itertools.product(
            block_ms, (64, 128), (64, 128), ((4, 3), (4, 4), (8, 3))):
        grid.append(GemmConfig(block_m, block_n, block_k, group_m=1 if block_m == 16 else 8,
                              num_warps=warps, num_stages=stages))
    return grid


def run_bf16(case: Case, config: GemmConfig | None = None) -> torch.Tensor:
    return fused_experts_triton(*case, config=config)


def tune(names: list[str], tokens: list[int], fp8: bool = False) -> None:
    """``fp8``: the block-FP8 experts' kernel (the grid's block_k, 64 and 128, divide the 128-wide scale block)."""
    print(f"tuning{' block-FP8 experts' if fp8 else ''}: CUDA-graph us per config; best vs default_config")
    print(f"{'shape':18s} {'tokens':>6s} {'pairs/E':>8s} {'default us':>10s} {'best us':>8s}  best config")
    gen = torch.Generator(device="cuda").manual_seed(2)
    best_by_bucket: dict[str, list[str]] = {}
    for name in names:
        shape = SHAPES[name]
        w13, w2 = make_weights(shape, gen)
        run = quantize_case_experts(w13, w2) if fp8 else run_bf16
        for num_tokens in tokens:
            case = make_case(shape, w13, w2, num_tokens, gen)
            per_expert = num_tokens * shape.top_k / shape.num_experts
            rep = 10 if num_tokens <= 256 else 20
            t_default = graph_us(lambda: run(case), rep_ms=rep)
            results = []
            for config in tune_grid(per_expert):
                try:
                    results.append((graph_us(lambda: run(case, config), rep_ms=rep), config))
                except Exception as exc:  # e.g. out of shared memory for the largest tiles with many stages
                    print(f"  skipped {config}: {type(exc).__name__}")
            t_best, best = min(results)
            row = f"{name:18s} {num_tokens:6d} {per_expert:8.2f} {t_default:10.1f} {t_best:8.1f}  {best}"
            print(row, flush=True)
            bucket = ("<=16" if per_expert <= 16 else "<=64" if per_expert <= 64 else "<=256" if per_expert <= 256
                      else ">256")
            best_by_bucket.setdefault(bucket, []).append(f"{name}/{num_tokens}: {tuple(best)}")
        del w13, w2, run, case  # the case holds the weights too
        torch.cuda.empty_cache()
    print("\nbest configs by pairs per expert (default_config's buckets):")
    for bucket, rows in best_by_bucket.items():
        print(f"  {bucket}:")
        for row in rows:
            print(f"    {row}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    parser.add_argument("--tune", action="store_true", help="sweep tune_grid's configs instead of the default run")
    parser.add_argument("--fp8", action="store_true", help="block-FP8 experts vs bf16 (with --tune: tune them)")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    start = time.perf_counter()
    if args.tune:
        tune(args.shapes, args.tokens, args.fp8)
    elif args.fp8:
        fp8_timing(args.shapes, args.tokens)
    else:
        check(args.shapes, [t for t in args.tokens if t in (1, 64, 1024)] or args.tokens[:1])
        timing(args.shapes, args.tokens)
        alignment(args.shapes, args.tokens)
        routing(args.tokens)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
