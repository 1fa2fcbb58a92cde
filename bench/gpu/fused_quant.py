"""FP8 activation quantization fused into RMSNorm and SiLU-mul (``radixlm.kernels.fused_quant``, issue #19) on a
GPU: the old composition (``fused_ops``' kernel, then the FP8 linear's Triton quantizer) against the fused kernel,
at Llama-3.1-8B's decode shapes: M 1 and 16 rows, hidden 4096 (the input norm; the post-attention add + norm) and
intermediate 14336 (SiLU-mul of the [M, 2 * 14336] gate_up output), bf16, quantized per token (online FP8) and per
token per 128-group (block FP8).

Each row: ``old us`` and ``fused us`` per call, medians of CUDA-graph replays (``do_bench_cudagraph``: launch
overhead excluded, L2 warm, as in a captured decode step), the saving, and ``bits``: whether the fused kernel's
quantized values, scales (and new residual) equal the old composition's at that shape.

    python bench/gpu/fused_quant.py     # well under a minute on an H200 (Triton compiles included)
    python bench/gpu/fused_quant.py --chunks 1024 4096 16384 --quants g128

``--chunks``: the fused kernels at each ``fused_quant._CHUNK`` (columns a program quantizes; 1024 serves: a
4096-wide row over four programs, each reading the whole row for the norm's statistic), beside the producer
alone (``plain us``: the norm or SiLU-mul kernel without quantization), to see what the quantization costs.

from the repository root with ``PYTHONPATH=.``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton.testing

from radixlm.kernels import fused_ops, fused_quant
from radixlm.kernels.fp8_activation import ActivationQuant, quantize_activation

HIDDEN, INTERMEDIATE = 4096, 14336
QUANTS = {"token": ActivationQuant(None), "g128": ActivationQuant(128)}


def graph_us(fn: Callable[[], object], rep_ms: int = 30) -> float:
    """Median us of CUDA-graph replays of ``fn``."""
    return triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median") * 1e3


def same(a, b) -> bool:
    """Equal bits of two results: FP8Activations (q, scale) and tensors, in matching tuples."""
    if isinstance(a, tuple) and not hasattr(a, "q"):
        return all(same(x, y) for x, y in zip(a, b))
    if hasattr(a, "q"):
        return torch.equal(a.q.view(torch.uint8), b.q.view(torch.uint8)) and torch.equal(a.scale, b.scale)
    return torch.equal(a, b)


def cases(m: int, quant: ActivationQuant, gen: torch.Generator):
    """(name, old, fused) callables at ``m`` rows."""
    x = torch.randn(m, HIDDEN, generator=gen, device="cuda").bfloat16()
    residual = torch.randn(m, HIDDEN, generator=gen, device="cuda").bfloat16()
    weight = (1 + 0.1 * torch.randn(HIDDEN, generator=gen, device="cuda")).bfloat16()
    gate_up = torch.randn(m, 2 * INTERMEDIATE, generator=gen, device="cuda").bfloat16()
    eps = 1e-5

    def old_add_norm():
        out, new_residual = fused_ops.fused_add_rms_norm(x, residual, weight, eps)
        return quantize_activation(out, quant), new_residual

    yield ("rms_norm", lambda: quantize_activation(fused_ops.rms_norm(x, weight, eps), quant),
           lambda: fused_quant.rms_norm_quant_fp8(x, None, weight, eps, quant)[0])
    yield ("add_rms_norm", old_add_norm, lambda: fused_quant.rms_norm_quant_fp8(x, residual, weight, eps, quant))
    yield ("silu_and_mul", lambda: quantize_activation(fused_ops.silu_and_mul(gate_up), quant),
           lambda: fused_quant.silu_and_mul_quant_fp8(gate_up, quant))


def plain(name: str, m: int, gen: torch.Generator) -> Callable[[], object]:
    """The producer of case ``name`` without quantization, at ``m`` rows."""
    x = torch.randn(m, HIDDEN, generator=gen, device="cuda").bfloat16()
    weight = torch.ones(HIDDEN, device="cuda", dtype=torch.bfloat16)
    if name == "rms_norm":
        return lambda: fused_ops.rms_norm(x, weight, 1e-5)
    if name == "add_rms_norm":
        return lambda: fused_ops.fused_add_rms_norm(x, x, weight, 1e-5)
    gate_up = torch.randn(m, 2 * INTERMEDIATE, generator=gen, device="cuda").bfloat16()
    return lambda: fused_ops.silu_and_mul(gate_up)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", nargs="+", type=int, help="fused_quant._CHUNK values to time the fused kernels at")
    parser.add_argument("--quants", nargs="+", choices=sorted(QUANTS), default=list(QUANTS))
    args = parser.parse_args()
    chunks = args.chunks or [fused_quant._CHUNK]
    print(f"{torch.cuda.get_device_name()}: bf16, hidden {HIDDEN}, intermediate {INTERMEDIATE}; us per call in "
          "CUDA graphs")
    print(f"{'op':14s} {'quant':>5s} {'M':>3s} {'plain us':>8s} {'old us':>7s} "
          + " ".join(f"{'fused@' + str(c):>11s}" for c in chunks) + f" {'bits':>5s}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    all_same, served = True, fused_quant._CHUNK
    try:
        for m in (1, 16):
            for quant_name in args.quants:
                for name, old, fused in cases(m, QUANTS[quant_name], gen):
                    times, bits = [], True
                    for chunk in chunks:
                        fused_quant._CHUNK = chunk
                        bits &= same(fused(), old())
                        times.append(graph_us(fused))
                    fused_quant._CHUNK = served
                    all_same &= bits
                    print(f"{name:14s} {quant_name:>5s} {m:3d} {graph_us(plain(name, m, gen)):8.2f} "
                          f"{graph_us(old):7.2f} " + " ".join(f"{t:11.2f}" for t in times)
                          + f" {'same' if bits else 'DIFF':>5s}")
    finally:
        fused_quant._CHUNK = served
    print("all bit-identical" if all_same else "MISMATCH: the fused kernels differ from the composition")


if __name__ == "__main__":
    main()
