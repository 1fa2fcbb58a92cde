"""Triton fused ops vs the layers' eager torch code vs ``torch.compile`` of that code, on CUDA.

Llama-3.1-8B shapes in bf16 (hidden 4096, intermediate 14336, 32 q / 8 kv heads of 128) at several token
counts.  For each implementation: ``us``, the ``triton.testing.do_bench`` median (L2 flushed before each
call), and the GB/s it achieves counting the bytes the op must read and write once; ``graph us``, the median
of CUDA-graph replays (``do_bench_cudagraph``, L2 not flushed), the GPU time alone.  At small token counts
the GPU work takes a few microseconds, less than launching it from Python (tens of microseconds for one
Triton launch on the H100 VMs), so there ``us`` partly times the host and ``graph us`` is what a captured
decode step pays.

    python bench/fused_ops.py [--tokens 1 64 256 4096]

from the repository root with radixlm installed (or ``PYTHONPATH=.``); under a minute on an H100, most of it
``torch.compile``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NamedTuple

import torch
import triton.testing

from radixlm.kernels import fused_ops
from radixlm.layers.activation import SiluAndMul
from radixlm.layers.layernorm import RMSNorm
from radixlm.layers.rotary import RotaryEmbedding

HIDDEN, INTERMEDIATE, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 4096, 14336, 32, 8, 128
MAX_POSITION, ROPE_SCALING = 131072, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
DTYPE = torch.bfloat16
IMPLS = ("triton", "eager", "compile")


class Case(NamedTuple):
    name: str
    moved: int  # bytes read + written, each once
    fused: Callable[[], object]  # the Triton kernel
    native: Callable[..., object]  # the layer's torch code
    args: tuple  # native's arguments


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def cases(num_tokens: int, norm: RMSNorm, act: SiluAndMul, rope: RotaryEmbedding) -> list[Case]:
    gen = torch.Generator(device="cuda").manual_seed(num_tokens)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device="cuda", dtype=DTYPE)

    x, residual = randn(num_tokens, HIDDEN), randn(num_tokens, HIDDEN)
    gate_up = randn(num_tokens, 2 * INTERMEDIATE)
    qkv = randn(num_tokens, (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM)
    # the strided views of the fused qkv output that LlamaAttention passes
    q_size, kv_size = NUM_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM
    q = qkv[:, :q_size].reshape(num_tokens, NUM_HEADS, HEAD_DIM)
    k = qkv[:, q_size : q_size + kv_size].reshape(num_tokens, NUM_KV_HEADS, HEAD_DIM)
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), generator=gen, device="cuda")
    return [
        Case("rms_norm", nbytes(x, x, norm.weight),
             lambda: fused_ops.rms_norm(x, norm.weight, norm.eps), norm.forward_native, (x,)),
        Case("add_rms_norm", nbytes(x, residual, x, residual, norm.weight),
             lambda: fused_ops.fused_add_rms_norm(x, residual, norm.weight, norm.eps),
             norm.forward_native, (x, residual)),
        Case("silu_and_mul", nbytes(gate_up) * 3 // 2,
             lambda: fused_ops.silu_and_mul(gate_up), act.forward_native, (gate_up,)),
        # cos and sin of rotary_dim / 2 fp32 each per token
        Case("rotary", 2 * nbytes(q, k) + nbytes(positions) + num_tokens * rope.rotary_dim * 4,
             lambda: fused_ops.apply_rotary(q, k, positions, rope.cos_sin_cache, rope.rotary_dim),
             rope.forward_native, (positions, q, k)),
    ]


def first(result: object) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result


def timings_us(fn: Callable[[], object]) -> tuple[float, float]:
    """(do_bench median, CUDA-graph replay median) in microseconds."""
    return (1e3 * triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"),
            1e3 * triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 256, 4096])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    norm, act = RMSNorm(HIDDEN, 1e-5, DTYPE).cuda(), SiluAndMul()
    norm.weight.normal_(1.0, 0.1)
    rope = RotaryEmbedding(HEAD_DIM, MAX_POSITION, 500000.0, ROPE_SCALING).cuda()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, {DTYPE}")
    print(f"{'':<29}" + "".join(f"{impl:^26}" for impl in IMPLS))
    print(f"{'op':<14}{'tokens':>7}{'MB':>8}" + f"{'us':>9}{'GB/s':>7}{'graph us':>10}" * len(IMPLS))
    for num_tokens in args.tokens:
        # Static shapes: every token count compiles its own graphs; dropping the last count's keeps each
        # function under dynamo's recompile limit however many counts are asked for.
        torch._dynamo.reset()
        for case in cases(num_tokens, norm, act, rope):
            compiled = torch.compile(case.native, dynamic=False)
            # A wrong kernel would make its timing meaningless: check it against the eager result first.
            torch.testing.assert_close(first(case.fused()), first(case.native(*case.args)), rtol=1.6e-2, atol=1e-2)
            row = f"{case.name:<14}{num_tokens:>7}{case.moved / 1e6:>8.2f}"
            for fn in (case.fused, lambda: case.native(*case.args), lambda: compiled(*case.args)):
                us, graph_us = timings_us(fn)
                row += f"{us:>9.1f}{case.moved / us / 1e3:>7.0f}{graph_us:>10.1f}"
            print(row, flush=True)


if __name__ == "__main__":
    main()
