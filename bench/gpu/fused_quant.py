"""FP8 activation quantization fused into RMSNorm and SiLU-mul (``radixlm.kernels.fused_quant``, issue #19) on a
GPU: the old composition (``fused_ops``' kernel, then the FP8 linear's Triton quantizer) against the fused kernel,
at Llama-3.1-8B's decode shapes: M 1 and 16 rows, hidden 4096 (the input norm; the post-attention add + norm) and
intermediate 14336 (SiLU-mul of the [M, 2 * 14336] gate_up output), bf16, quantized per token (online FP8) and per
token per 128-group (block FP8).

Each row: ``old us`` and ``fused us`` per call, medians of CUDA-graph replays (``do_bench_cudagraph``: launch
overhead excluded, L2 warm, as in a captured decode step), the saving, and ``bits``: whether the fused kernel's
quantized values, scales (and new residual) equal the old composition's at that shape.

    python bench/gpu/fused_quant.py     # well under a minute on an H200 (Triton compiles included)

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


def main() -> None:
    print(f"{torch.cuda.get_device_name()}: bf16, hidden {HIDDEN}, intermediate {INTERMEDIATE}; us per call in "
          "CUDA graphs")
    print(f"{'op':14s} {'quant':>5s} {'M':>3s} {'old us':>7s} {'fused us':>8s} {'saved':>6s} {'bits':>5s}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    all_same = True
    for m in (1, 16):
        for quant_name, quant in QUANTS.items():
            for name, old, fused in cases(m, quant, gen):
                bits = same(fused(), old())
                all_same &= bits
                t_old, t_fused = graph_us(old), graph_us(fused)
                print(f"{name:14s} {quant_name:>5s} {m:3d} {t_old:7.2f} {t_fused:8.2f} {t_old - t_fused:6.2f} "
                      f"{'same' if bits else 'DIFF':>5s}")
    print("all bit-identical" if all_same else "MISMATCH: the fused kernels differ from the composition")


if __name__ == "__main__":
    main()
