"""Greedy sampling's row argmax: ``torch.argmax`` against the two-pass Triton kernel (``radixlm.kernels.argmax``),
float32 logits rows over Llama-3's 128,256-token vocabulary (and SmolLM2's 49,152), us per call (CUDA events,
median; each call also pays its launches, as sampling does outside the graph), and whether the indices agree.

    PYTHONPATH=. python bench/gpu/argmax.py
"""

from __future__ import annotations

import torch
import triton

from radixlm.kernels.argmax import triton_argmax


def main() -> None:
    print(f"{'rows':>5} {'vocab':>7} {'torch us':>9} {'triton us':>10}  same")
    for vocab in (128256, 49152):
        for rows in (1, 8, 64, 256):
            x = torch.randn(rows, vocab, device="cuda")
            same = torch.equal(triton_argmax(x), x.argmax(dim=-1))
            t_torch = triton.testing.do_bench(lambda: x.argmax(dim=-1), warmup=5, rep=50, return_mode="median")
            t_ours = triton.testing.do_bench(lambda: triton_argmax(x), warmup=5, rep=50, return_mode="median")
            print(f"{rows:>5} {vocab:>7} {t_torch * 1e3:9.2f} {t_ours * 1e3:10.2f}  {same}", flush=True)


if __name__ == "__main__":
    main()
