"""Block-wise FP8 (``radixlm.kernels.fp8``, issue #19) on a GPU: correctness at real shapes, timing, tuning.

Shapes: Llama-3.1-8B's linears (qkv, o, gate_up, down) and DeepSeek-V3's (q_a, kv_a, o, the shared expert's
gate_up and down, the lm head), weights random E4M3 with random 128x128 block scales; M (tokens) 1 .. 4096.

Default mode:
1. correctness: ``fp8_block_linear`` (activation quantization + block GEMM, bf16 out) at M 1, 64, 1024 against
   (a) the same quantized operands dequantized to fp32 and multiplied in fp32 (asserted < 1e-2: bf16 output
   rounding only) and (b) the unquantized bf16 activations times the dequantized weight (printed; the activations'
   fp8 rounding, a few percent, asserted < 6e-2);
2. timing (``triton.testing.do_bench`` medians, L2 flushed), TFLOP/s of 2*M*N*K per (shape, M):
   ``gemm`` the block GEMM on pre-quantized activations, ``linear`` with the activation quantization (two
   launches), ``bf16`` torch.matmul on the dequantized bf16 weight (cuBLAS), ``rowwise`` torch._scaled_mm with
   per-row activation / per-column weight scales (the per-channel online-FP8 path; GEMM only), ``channel`` the
   online-FP8 layer as served, ``TB/s`` the fp8 weight bytes over the ``gemm`` time (the roofline of decode
   rows), and ``cublasB`` cuBLAS's block-scaled GEMM (``cublas_block_gemm``, a candidate not yet wired in) with
   its relative error against the fp32 product of the same quantized operands;
3. fused MoE at DeepSeek-V3's expert shapes (256 experts, hidden 7168, top 8; inter 2048 = TP1, 256 = TP8):
   fp8 experts vs the same experts dequantized to bf16, relative error and CUDA-graph us for both.

``--tune-gemv``: the decode GEMV (``fp8_gemv``, pre-quantized activations) per config at M = 1, block and
per-channel weights; then at M = 1 and 16 its default and best configs, the layer as served (quantizer + GEMV)
and bf16 cuBLAS.  All in CUDA graphs over enough weight copies (``ROTATE_BYTES``) that every call reads its
weight from HBM, as a decode step's back-to-back layers do; weight TB/s per row.

``--pdl``: the layer as served at M = 1 and 16 (quantizer + GEMV, per-channel and block weights, 128-group
activations) with programmatic dependent launch off, on, and on with 1 or 2 weight tiles a GEMV program
requests before its wait (``GemvConfig.preload``); same timing.

``--cublas-small-m``: at decode sizes (M = 1 and 16, per-channel weights) the served online-FP8 layer (the
Triton quantizer + GEMV) against cuBLAS's row-wise FP8 GEMM (``torch._scaled_mm``) on the same quantized rows
padded to 16 (its smallest M), and bf16 cuBLAS; same timing, outputs compared.

``--tune``: every config of a small grid (``tune_grid``) per (shape, M), prints the best per row and a summary
by M bucket, from which ``fp8_gemm.default_fp8_config`` can be updated.

    python bench/gpu/fp8_gemm.py             # ~2-3 minutes on an H200 (Triton compiles included)
    python bench/gpu/fp8_gemm.py --tune      # ~4-5 minutes
    python bench/gpu/fp8_gemm.py --tune-gemv --shapes llama8b-qkv llama8b-o llama8b-gate_up llama8b-down v3-o
    python bench/gpu/fp8_gemm.py --pdl --shapes llama8b-qkv llama8b-o llama8b-gate_up llama8b-down
    python bench/gpu/fp8_gemm.py --shapes v3-kv_a v3-o --tokens 1 64 --no-moe   # a subset

from the repository root with ``PYTHONPATH=.``.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
import triton
import triton.testing

from radixlm.kernels.fp8 import (
    FP8_DTYPE, FP8_MAX, dequantize_block_fp8, fp8_block_linear, per_token_group_quant_fp8,
    w8a8_block_fp8_matmul_torch,
)
from radixlm.kernels.fp8_gemm import (
    default_fp8_config, per_token_group_quant_fp8_triton, per_token_quant_fp8_triton, w8a8_block_fp8_matmul_triton,
)
from radixlm.kernels.fp8_gemv import GemvConfig, default_gemv_config, fp8_gemv
from radixlm.kernels.launch_tables import write_launch_table
from radixlm.kernels.gemm_config import GemmConfig
from radixlm.layers.fp8_linear import fp8_channel_linear, quantize_online
from radixlm.kernels.fused_moe import fused_experts

BLOCK = (128, 128)


class Linear(NamedTuple):
    k: int  # in features
    n: int  # out features


SHAPES = {
    "llama8b-qkv": Linear(4096, 6144),
    "llama8b-o": Linear(4096, 4096),
    "llama8b-gate_up": Linear(4096, 28672),
    "llama8b-down": Linear(14336, 4096),
    "v3-q_a": Linear(7168, 1536),
    "v3-kv_a": Linear(7168, 576),
    "v3-o": Linear(16384, 7168),
    "v3-shared_gate_up": Linear(7168, 4096),
    "v3-shared_down": Linear(2048, 7168),
    "v3-lm_head": Linear(7168, 129280),
}
TOKENS = (1, 16, 64, 256, 1024, 4096)
MOE_SHAPES = {"v3-experts-tp1": 2048, "v3-experts-tp8": 256}  # inter; 256 experts, hidden 7168, top 8
MOE_TOKENS = (1, 16, 64, 256, 1024, 4096)
ROTATE_BYTES = 256 << 20  # weight bytes a rotating timing cycles through: five times the H200's 50 MB L2


def random_fp8_weight(n: int, k: int, gen: torch.Generator, lead: tuple[int, ...] = ()) -> tuple[torch.Tensor,
                                                                                                   torch.Tensor]:
    """An fp8 weight ``[*lead, n, k]`` spread over E4M3's range, with block scales near 1 / (448 sqrt(k)) so the
    dequantized weight has unit-variance rows / sqrt(k) (realistic magnitudes for bf16 outputs)."""
    w_q = (torch.randn(*lead, n, k, generator=gen, device="cuda", dtype=torch.bfloat16) * 100).clamp_(
        -FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    scale_shape = (*lead, triton.cdiv(n, BLOCK[0]), triton.cdiv(k, BLOCK[1]))
    w_s = (0.5 + torch.rand(scale_shape, generator=gen, device="cuda")) / (100 * k**0.5)
    return w_q, w_s


def dequantize_bf16(w_q: torch.Tensor, w_s: torch.Tensor) -> torch.Tensor:
    """The bf16 copy of a (possibly per-expert) block-fp8 weight, built a slice at a time (the fp32 temporaries
    of a whole expert stack would not fit)."""
    if w_q.dim() == 2:
        return torch.cat([dequantize_block_fp8(w_q[i:i + 8192], w_s[i // BLOCK[0]:(i + 8192) // BLOCK[0]],
                                               BLOCK).bfloat16() for i in range(0, w_q.shape[0], 8192)])
    return torch.stack([dequantize_block_fp8(w_q[e], w_s[e], BLOCK).bfloat16() for e in range(w_q.shape[0])])


def bench_us(fn: Callable[[], object], rep_ms: int = 25) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=rep_ms) * 1e3


def graph_us(fn: Callable[[], object], rep_ms: int = 25) -> float:
    """Median of CUDA-graph replays of ``fn`` (L2 not flushed)."""
    return triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median") * 1e3


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def rowwise_operands(w_bf16: torch.Tensor, x: torch.Tensor):
    """Per-channel online FP8 for torch._scaled_mm: the weight per output row, the activations per token."""
    w_scale = w_bf16.float().abs().amax(dim=1).clamp_min(1e-10) / FP8_MAX  # [N]
    w_q = (w_bf16.float() / w_scale[:, None]).to(FP8_DTYPE)  # [N, K]
    x_scale = x.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-10) / FP8_MAX  # [M, 1]
    x_q = (x.float() / x_scale).to(FP8_DTYPE)
    return x_q, x_scale, w_q.t(), w_scale[None, :]  # b column-major [K, N], scale_b [1, N]


def cublas_block_gemm(x_q: torch.Tensor, x_s: torch.Tensor, w_q: torch.Tensor, w_s: torch.Tensor) -> torch.Tensor:
    """The block-scaled GEMM by cuBLAS (torch's ``scaled_mm`` with DeepSeek's recipes, sm_90): activations 1x128
    (scales ``[M, K / 128]`` stored M-major), weights 128x128 (``mat_b = w_q^T`` [K, N], scales ``[K / 128, N /
    128]``).  A candidate for the layers' prefill path, timed here before it is wired in."""
    from torch.nn.functional import ScalingType, scaled_mm

    return scaled_mm(x_q, w_q.t(), x_s.t().contiguous().t(), ScalingType.BlockWise1x128, w_s.t(),
                     ScalingType.BlockWise128x128, output_dtype=torch.bfloat16)


def check(names: list[str], tokens: list[int]) -> None:
    print("correctness: fp8_block_linear (bf16 out) vs the same quantized operands in fp32 (same-q) and vs the "
          "unquantized bf16 activations (dense), relative Frobenius error")
    gen = torch.Generator(device="cuda").manual_seed(0)
    worst_same, worst_dense = 0.0, 0.0
    for name in names:
        shape = SHAPES[name]
        w_q, w_s = random_fp8_weight(shape.n, shape.k, gen)
        w = dequantize_bf16(w_q, w_s)
        row = []
        for m in tokens:
            x = torch.randn(m, shape.k, generator=gen, device="cuda", dtype=torch.bfloat16)
            out = fp8_block_linear(x, w_q, w_s)
            x_q, x_s = per_token_group_quant_fp8(x)
            same = rel_err(out, w8a8_block_fp8_matmul_torch(x_q, x_s, w_q, w_s, BLOCK, torch.float32))
            dense = rel_err(out, x.double() @ w.double().T)
            worst_same, worst_dense = max(worst_same, same), max(worst_dense, dense)
            row.append(f"M{m}: same-q {same:.1e} dense {dense:.1e}")
        print(f"  {name:18s} " + "  ".join(row))
        del w_q, w_s, w
        torch.cuda.empty_cache()
    assert worst_same < 1e-2 and worst_dense < 6e-2, (worst_same, worst_dense)
    print(f"  worst same-q {worst_same:.2e} (< 1e-2: ok), dense {worst_dense:.2e} (< 6e-2: ok)")


def timing(names: list[str], tokens: list[int]) -> None:
    print("\ntiming, TFLOP/s (2*M*N*K / do_bench median); TB/s: fp8 weight bytes / gemm time")
    print(f"{'shape':18s} {'M':>5s} {'gemm us':>8s} {'gemm':>7s} {'linear':>7s} {'bf16':>7s} {'rowwise':>7s} "
          f"{'channel':>7s} {'TB/s':>5s} {'lin TB/s':>8s} {'ch TB/s':>7s} {'bf16 TB/s':>9s} {'cublasB':>7s} "
          f"{'cB err':>8s}  config")
    gen = torch.Generator(device="cuda").manual_seed(1)
    for name in names:
        shape = SHAPES[name]
        w_q, w_s = random_fp8_weight(shape.n, shape.k, gen)
        w = dequantize_bf16(w_q, w_s)
        w_ch, w_ch_scale = quantize_online(w)
        for m in tokens:
            x = torch.randn(m, shape.k, generator=gen, device="cuda", dtype=torch.bfloat16)
            x_q, x_s = per_token_group_quant_fp8(x)
            flops = 2.0 * m * shape.n * shape.k
            t_gemm = bench_us(lambda: w8a8_block_fp8_matmul_triton(x_q, x_s, w_q, w_s, BLOCK))
            t_linear = bench_us(lambda: fp8_block_linear(x, w_q, w_s))
            t_bf16 = bench_us(lambda: torch.matmul(x, w.T))
            try:
                rq, rs, wq_col, ws_row = rowwise_operands(w, x)
                t_row = bench_us(lambda: torch._scaled_mm(rq, wq_col, scale_a=rs, scale_b=ws_row,
                                                          out_dtype=torch.bfloat16))
                del rq, rs, wq_col, ws_row
            except (RuntimeError, AttributeError) as exc:  # not every build/shape has the row-wise path
                print(f"  _scaled_mm: {str(exc).splitlines()[0][:100]}")
                t_row = float("nan")
            t_channel = bench_us(lambda: fp8_channel_linear(x, w_ch, w_ch_scale))
            try:
                cublas_err = rel_err(cublas_block_gemm(x_q, x_s, w_q, w_s),
                                     w8a8_block_fp8_matmul_torch(x_q, x_s, w_q, w_s, BLOCK, torch.float32))
                t_cublas = bench_us(lambda: cublas_block_gemm(x_q, x_s, w_q, w_s))
            except (RuntimeError, ValueError, NotImplementedError, ImportError, TypeError) as exc:  # no such recipe
                print(f"  cuBLAS block-scaled: {str(exc).splitlines()[0][:100]}")
                cublas_err, t_cublas = float("nan"), float("nan")
            c = default_fp8_config(m, shape.n, shape.k, BLOCK)
            nk = shape.n * shape.k
            print(f"{name:18s} {m:5d} {t_gemm:8.1f} {flops / t_gemm / 1e6:7.1f} {flops / t_linear / 1e6:7.1f} "
                  f"{flops / t_bf16 / 1e6:7.1f} {flops / t_row / 1e6:7.1f} {flops / t_channel / 1e6:7.1f} "
                  f"{nk / t_gemm / 1e6:5.2f} {nk / t_linear / 1e6:8.2f} {nk / t_channel / 1e6:7.2f} "
                  f"{2 * nk / t_bf16 / 1e6:9.2f} {flops / t_cublas / 1e6:7.1f} {cublas_err:8.1e}  "
                  f"m{c.block_m} n{c.block_n} k{c.block_k} w{c.num_warps} s{c.num_stages}", flush=True)
        del w_q, w_s, w, w_ch, w_ch_scale
        torch.cuda.empty_cache()


def moe(names: list[str], tokens: list[int]) -> None:
    print("\nfused MoE, DeepSeek-V3 experts (E=256, hidden 7168, top 8): fp8 block experts vs the same experts in "
          "bf16; CUDA-graph us, TF/s of 2*tokens*8*3*hidden*inter")
    print(f"{'shape':16s} {'tokens':>6s} {'rel err':>8s} {'fp8 us':>8s} {'TF/s':>6s} {'bf16 us':>8s} {'TF/s':>6s}")
    gen = torch.Generator(device="cuda").manual_seed(2)
    experts, hidden, top_k = 256, 7168, 8
    for name in names:
        inter = MOE_SHAPES[name]
        w13_q, w13_s = random_fp8_weight(2 * inter, hidden, gen, (experts,))
        w2_q, w2_s = random_fp8_weight(hidden, inter, gen, (experts,))
        w13, w2 = dequantize_bf16(w13_q, w13_s), dequantize_bf16(w2_q, w2_s)
        for num_tokens in tokens:
            x = torch.randn(num_tokens, hidden, generator=gen, device="cuda", dtype=torch.bfloat16)
            ids = torch.rand(num_tokens, experts, generator=gen, device="cuda").topk(top_k, dim=1).indices.int()
            weights = torch.rand(num_tokens, top_k, generator=gen, device="cuda").softmax(dim=1)
            fp8_call = lambda: fused_experts(x, w13_q, w2_q, weights, ids, w13_s, w2_s, BLOCK)  # noqa: E731
            bf16_call = lambda: fused_experts(x, w13, w2, weights, ids)  # noqa: E731
            err = rel_err(fp8_call(), bf16_call())
            flops = 2.0 * num_tokens * top_k * 3 * hidden * inter
            t_fp8, t_bf16 = graph_us(fp8_call), graph_us(bf16_call)
            print(f"{name:16s} {num_tokens:6d} {err:8.1e} {t_fp8:8.1f} {flops / t_fp8 / 1e6:6.1f} {t_bf16:8.1f} "
                  f"{flops / t_bf16 / 1e6:6.1f}", flush=True)
            assert err < 6e-2, err
        del w13_q, w13_s, w2_q, w2_s, w13, w2
        torch.cuda.empty_cache()


def tune_grid(m: int) -> list[GemmConfig]:
    """Configs worth trying at this M (block_m near it); block_k divides the 128-wide scale slice."""
    block_ms = (16, 32) if m <= 16 else (16, 32, 64) if m <= 64 else (64, 128)
    block_ns = (64, 128) if m <= 64 else (128, 256)
    grid = []
    for block_m, block_n, block_k, (warps, stages) in itertools.product(
            block_ms, block_ns, (64, 128), ((4, 3), (4, 4), (8, 3), (8, 4))):
        grid.append(GemmConfig(block_m, block_n, block_k, group_m=1 if block_m <= 32 else 8,
                                  num_warps=warps, num_stages=stages))
    return grid


def tune(names: list[str], tokens: list[int]) -> None:
    print("tuning: do_bench us of the block GEMM per config; best vs default_fp8_config")
    print(f"{'shape':18s} {'M':>5s} {'default us':>10s} {'best us':>8s} {'best TF/s':>9s}  best config")
    gen = torch.Generator(device="cuda").manual_seed(3)
    best_by_bucket: dict[str, list[str]] = {}
    for name in names:
        shape = SHAPES[name]
        w_q, w_s = random_fp8_weight(shape.n, shape.k, gen)
        for m in tokens:
            x_q, x_s = per_token_group_quant_fp8(torch.randn(m, shape.k, generator=gen, device="cuda",
                                                             dtype=torch.bfloat16))
            t_default = bench_us(lambda: w8a8_block_fp8_matmul_triton(x_q, x_s, w_q, w_s, BLOCK), rep_ms=10)
            results = []
            for config in tune_grid(m):
                try:
                    results.append((bench_us(lambda: w8a8_block_fp8_matmul_triton(
                        x_q, x_s, w_q, w_s, BLOCK, config=config), rep_ms=10), config))
                except Exception as exc:  # e.g. out of shared memory for the largest tiles with many stages
                    print(f"  skipped {tuple(config)}: {type(exc).__name__}")
            t_best, best = min(results)
            flops = 2.0 * m * shape.n * shape.k
            print(f"{name:18s} {m:5d} {t_default:10.1f} {t_best:8.1f} {flops / t_best / 1e6:9.1f}  {tuple(best)}",
                  flush=True)
            bucket = "<=16" if m <= 16 else "<=64" if m <= 64 else "<=256" if m <= 256 else ">256"
            best_by_bucket.setdefault(bucket, []).append(f"{name}/{m}: {tuple(best)} "
                                                         f"({t_default / t_best:.2f}x default)")
        del w_q, w_s
        torch.cuda.empty_cache()
    print("\nbest configs by M (default_fp8_config's buckets):")
    for bucket, rows in best_by_bucket.items():
        print(f"  {bucket}:")
        for row in rows:
            print(f"    {row}")


def weight_copies(shape: Linear, gen: torch.Generator) -> tuple[list, list, list]:
    """Enough copies of a random weight of ``shape`` that a rotating timing reads each from HBM
    (``ROTATE_BYTES``), in the three forms: block FP8 (w_q, w_s), dequantized bf16, per-channel FP8 (w_q, w_s)."""
    blocks = [random_fp8_weight(shape.n, shape.k, gen) for _ in range(max(2, -(-ROTATE_BYTES // (shape.n * shape.k))))]
    bf16 = [dequantize_bf16(w_q, w_s) for w_q, w_s in blocks]
    return blocks, bf16, [quantize_online(w) for w in bf16]


def rotating_graph_us(calls: list[Callable[[], object]]) -> float:
    """us per call of ``calls`` (each on its own weight copy) captured back to back in one CUDA graph."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return triton.testing.do_bench(graph.replay, warmup=3, rep=30, return_mode="median") * 1e3 / len(calls)


def gemv_grid(fmt: str) -> list[GemvConfig]:
    """The decode GEMV's sweep: 16-128 weight rows a program, 3-6 stages, 1-8 K splits (4 warps; 2 and 8 at
    the narrow and wide tiles), and deep pipelines (8-12 stages) of 32-64 rows with few splits, which keep as
    many weight bytes in flight with fewer programs.  K tiles are 128: the block weights' scale block, and the
    served per-channel path's activation group."""
    grid = [GemvConfig(bn, 128, 4, st, sk) for bn, st, sk in itertools.product((16, 32, 64, 128), (3, 4, 6),
                                                                              (1, 2, 3, 4, 6, 8))]
    grid += [GemvConfig(bn, 128, w, 4, sk) for bn, w in ((16, 2), (32, 2), (128, 8)) for sk in (1, 2, 4)]
    grid += [GemvConfig(bn, 128, w, st, sk) for bn, w, st, sk in itertools.product((32, 64), (4, 8), (8, 12), (1, 2))]
    return grid


def tune_gemv(names: list[str], tokens: list[int], fmts: list[str], write_configs: str | None) -> None:
    """``fp8_gemv`` per config of ``gemv_grid`` at M = 1 on the served decode forms (block weights with
    128-group activations; per-channel weights with 128-group activations, online FP8's decode rows), CUDA graphs
    over rotating weights, each config's output checked against the default's; then per M the default and best
    configs, the FP8 layer as served (quantizer + GEMV) and bf16 cuBLAS.  ``write_configs``: the best per-channel
    config of each shape as ``RADIXLM_GEMV_CONFIGS`` reads them."""
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    print("decode GEMV: us per call in CUDA graphs over rotating weight copies; TB/s of weight bytes")
    print(f"{'shape':18s} {'fmt':>5s} {'M':>3s} {'default us':>10s} {'TB/s':>5s} {'best us':>8s} {'TB/s':>5s} "
          f"{'layer us':>8s} {'TB/s':>5s} {'bf16 us':>8s} {'TB/s':>5s}  default / best config")
    gen = torch.Generator(device="cuda").manual_seed(5)
    table: dict[str, list[int]] = {}
    for name in names:
        shape = SHAPES[name]
        blocks, bf16, chans = weight_copies(shape, gen)
        default = default_gemv_config(shape.n, shape.k, num_sms)
        for fmt in fmts:
            weights = [(w_q, w_s, BLOCK) for w_q, w_s in blocks] if fmt == "block" else \
                [(w_q, w_s, None) for w_q, w_s in chans]

            def gemv_us(x: torch.Tensor, config: GemvConfig) -> float:
                x_q, x_s = per_token_group_quant_fp8(x)
                return rotating_graph_us([lambda w=w: fp8_gemv(x_q, x_s, *w, config=config) for w in weights])

            x1 = torch.randn(1, shape.k, generator=gen, device="cuda", dtype=torch.bfloat16)
            x1_q, x1_s = per_token_group_quant_fp8(x1)
            expected = fp8_gemv(x1_q, x1_s, *weights[0], config=default).float()
            results = []
            for config in gemv_grid(fmt):
                try:
                    err = rel_err(fp8_gemv(x1_q, x1_s, *weights[0], config=config).float(), expected)
                    if err > 1e-2:
                        print(f"  WRONG {tuple(config)}: rel err {err:.2e}")
                        continue
                    results.append((gemv_us(x1, config), config))
                except Exception as exc:  # out of shared memory, or a tile shape the FP8 dot refuses
                    print(f"  skipped {tuple(config)}: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
            results.sort()
            print(f"  {name} {fmt} M=1 top 6: " + "  ".join(f"{tuple(c)} {t:.1f}" for t, c in results[:6]),
                  flush=True)
            best = results[0][1]
            if fmt == "chan":
                table[f"{shape.n},{shape.k}"] = list(best)
            for m in tokens:
                x = torch.randn(m, shape.k, generator=gen, device="cuda", dtype=torch.bfloat16)
                t_default, t_best = gemv_us(x, default), gemv_us(x, best)
                if fmt == "block":
                    t_layer = rotating_graph_us([lambda w=w: fp8_block_linear(x, w[0], w[1], None, BLOCK)
                                                 for w in weights])
                else:
                    t_layer = rotating_graph_us([lambda w=w: fp8_channel_linear(x, w[0], w[1]) for w in weights])
                t_bf16 = rotating_graph_us([lambda w=w: torch.matmul(x, w.t()) for w in bf16])
                nk = shape.n * shape.k
                print(f"{name:18s} {fmt:>5s} {m:3d} {t_default:10.1f} {nk / t_default / 1e6:5.2f} {t_best:8.1f} "
                      f"{nk / t_best / 1e6:5.2f} {t_layer:8.1f} {nk / t_layer / 1e6:5.2f} {t_bf16:8.1f} "
                      f"{2 * nk / t_bf16 / 1e6:5.2f}  {tuple(default)} / {tuple(best)}", flush=True)
        del blocks, bf16, chans, weights
        torch.cuda.empty_cache()
    if write_configs:
        write_launch_table(write_configs, table)


def pdl_layers(names: list[str], tokens: list[int]) -> None:
    """The FP8 layer as served (quantizer, then the GEMV at its default config) without PDL, with PDL, and with
    PDL and 1 or 2 weight tiles a program requested before its wait (``GemvConfig.preload``); the outputs
    bit-equal."""
    variants = [(False, 0), (True, 0), (True, 1), (True, 2)]  # (PDL, preload)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    print("FP8 layer (quantizer + GEMV): us per call in CUDA graphs over rotating weight copies")
    print(f"{'shape':18s} {'fmt':>5s} {'M':>3s} {'no PDL us':>9s} {'PDL us':>9s} {'+pre 1':>9s} {'+pre 2':>9s} "
          f"{'TB/s best':>9s}")
    gen = torch.Generator(device="cuda").manual_seed(7)
    for name in names:
        shape = SHAPES[name]
        blocks, bf16, chans = weight_copies(shape, gen)
        default = default_gemv_config(shape.n, shape.k, num_sms)
        for fmt, weights in (("block", [(q, s, BLOCK) for q, s in blocks]), ("chan", [(q, s, None) for q, s in chans])):
            for m in tokens:
                x = torch.randn(m, shape.k, generator=gen, device="cuda", dtype=torch.bfloat16)

                def layer(w, variant: tuple[bool, int]) -> torch.Tensor:
                    pdl, preload = variant
                    # the served decode forms: 128-group activations for both weight formats
                    x_q, x_s = per_token_group_quant_fp8_triton(x, 128, pdl=pdl)
                    return fp8_gemv(x_q, x_s, *w, config=default._replace(preload=preload), pdl=pdl)

                outs = [layer(weights[0], v) for v in variants]
                same = all(torch.equal(o, outs[0]) for o in outs)
                times = [rotating_graph_us([lambda w=w, v=v: layer(w, v) for w in weights]) for v in variants]
                print(f"{name:18s} {fmt:>5s} {m:3d} " + " ".join(f"{t:9.1f}" for t in times)
                      + f" {shape.n * shape.k / min(times) / 1e6:9.2f}" + ("" if same else "  OUTPUTS DIFFER"),
                      flush=True)
        del blocks, bf16, chans
        torch.cuda.empty_cache()


def cublas_small_m(names: list[str], tokens: list[int]) -> None:
    """The decode-sized online-FP8 layer: ours against cuBLAS's row-wise FP8 GEMM on rows padded to 16."""
    print("online-FP8 layer at decode sizes: us per call in CUDA graphs over rotating weight copies")
    print(f"{'shape':18s} {'M':>3s} {'ours':>7s} {'TB/s':>5s} {'cuBLAS fp8':>10s} {'TB/s':>5s} {'bf16':>7s} "
          f"{'TB/s':>5s}  rel err")
    gen = torch.Generator(device="cuda").manual_seed(11)
    for name in names:
        shape = SHAPES[name]
        blocks, bf16, chans = weight_copies(shape, gen)
        for m in tokens:
            x = torch.randn(m, shape.k, generator=gen, device="cuda", dtype=torch.bfloat16)
            x_pad = torch.zeros(16, shape.k, device="cuda", dtype=FP8_DTYPE)
            s_pad = torch.ones(16, 1, device="cuda", dtype=torch.float32)

            def cublas(w):
                x_q, x_s = per_token_quant_fp8_triton(x)
                x_pad[:m].copy_(x_q)
                s_pad[:m].copy_(x_s)
                return torch._scaled_mm(x_pad, w[0].t(), scale_a=s_pad, scale_b=w[1][None, :].float(),
                                        out_dtype=torch.bfloat16)[:m]

            err = rel_err(cublas(chans[0]).float(), fp8_channel_linear(x, *chans[0]).float())
            t_ours = rotating_graph_us([lambda w=w: fp8_channel_linear(x, *w) for w in chans])
            t_cublas = rotating_graph_us([lambda w=w: cublas(w) for w in chans])
            t_bf16 = rotating_graph_us([lambda w=w: torch.matmul(x, w.t()) for w in bf16])
            nk = shape.n * shape.k
            print(f"{name:18s} {m:3d} {t_ours:7.1f} {nk / t_ours / 1e6:5.2f} {t_cublas:10.1f} "
                  f"{nk / t_cublas / 1e6:5.2f} {t_bf16:7.1f} {2 * nk / t_bf16 / 1e6:5.2f}  {err:.1e}", flush=True)
        del blocks, bf16, chans
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    parser.add_argument("--moe-shapes", nargs="+", choices=sorted(MOE_SHAPES), default=list(MOE_SHAPES))
    parser.add_argument("--no-moe", action="store_true", help="skip the fused MoE rows")
    parser.add_argument("--tune", action="store_true", help="sweep tune_grid's configs instead of the default run")
    parser.add_argument("--tune-gemv", action="store_true", help="sweep the decode GEMV's configs (M <= 16)")
    parser.add_argument("--gemv-formats", nargs="+", choices=("block", "chan"), default=["block", "chan"],
                        help="--tune-gemv: the weight formats to sweep")
    parser.add_argument("--write-configs", help="--tune-gemv: write each shape's best per-channel config here "
                        "(JSON, for RADIXLM_GEMV_CONFIGS)")
    parser.add_argument("--pdl", action="store_true", help="the decode layer without and with PDL")
    parser.add_argument("--cublas-small-m", action="store_true", help="decode-sized online FP8: ours vs cuBLAS")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    start = time.perf_counter()
    if args.cublas_small_m:
        cublas_small_m(args.shapes, [t for t in args.tokens if t <= 16])
    elif args.pdl:
        pdl_layers(args.shapes, [t for t in args.tokens if t <= 16])
    elif args.tune_gemv:
        tune_gemv(args.shapes, [t for t in args.tokens if t <= 16], args.gemv_formats, args.write_configs)
    elif args.tune:
        tune(args.shapes, args.tokens)
    else:
        check(args.shapes, [t for t in args.tokens if t in (1, 64, 1024)] or args.tokens[:1])
        timing(args.shapes, args.tokens)
        if not args.no_moe:
            moe(args.moe_shapes, [t for t in MOE_TOKENS if t in args.tokens] or MOE_TOKENS)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
