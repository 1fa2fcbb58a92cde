"""The served Gluon FP8 GEMV (``radixlm.kernels.gluon_gemv``) per launch against ``fp8_gemv``'s Triton kernel.

At Llama-3.1-8B's four projections, one token, 128-group activations, per-channel weights: the Triton kernel at
its default launch, then the Gluon kernel at its default ``Launch`` and at the other launches runs S4-S7 found
best (ring slots, K tiles a slot, K split, slots requested before the PDL wait; 64 or 128 weight rows a
program).  Each row: the GEMV alone and the quantizer + GEMV launched with PDL (the layer as served), us per
call in CUDA graphs over rotating weight copies, and the output's distance from the Triton kernel's.  GPU runs
S1-S7 in docs/benchmarks.md.

    PYTHONPATH=. python bench/gpu/gluon_gemv.py [--shapes o qkv down] [--sweep]
"""

from __future__ import annotations

import argparse

import torch

from radixlm.kernels.gluon_gemv import Launch, gluon_fp8_gemv

SHAPES = {"o": (4096, 4096), "qkv": (6144, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}  # (N, K)


def gluon_gemv(x_q: torch.Tensor, x_s: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               block_n: int = 64, stages: int = 4, sub: int = 1, split_k: int = 4, preload: int = 2,
               pdl: bool = False) -> torch.Tensor:
    """The served Gluon GEMV at a given launch, bf16 out."""
    return gluon_fp8_gemv(x_q, x_s, weight, weight_scale, torch.bfloat16, pdl,
                          Launch(block_n, stages, sub, split_k, preload))


CONFIGS = [  # (block_n, stages, sub, split_k, preload): S4-S7's best launches
    (64, 3, 4, 1, 3), (64, 4, 2, 1, 4), (64, 6, 2, 1, 6), (64, 4, 1, 2, 2), (64, 4, 1, 8, 2), (64, 6, 1, 4, 4),
    (128, 3, 2, 1, 3),
]


def sweep(name: str) -> list[tuple[int, int, int, int, int]]:
    """``--sweep``: launches around the default per shape (ring slots, K splits, slots before the PDL wait; one
    K tile a slot), and for gate_up's 448 tiles of 64 rows also 128 rows and fewer splits."""
    splits = (2, 4, 8, 16) if name == "down" else (2, 4, 8)
    grid = [(64, st, 1, sk, pre) for st in (3, 4, 6) for sk in splits for pre in sorted({1, 2, st})]
    if name == "gate_up":
        grid = [(bn, st, 1, sk, pre) for bn in (64, 128) for st in (3, 4, 6) for sk in (1, 2)
                for pre in sorted({2, st})]
    return [c for c in grid if c != tuple(Launch())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--sweep", action="store_true",
                        help="time a grid of launches per shape (quantizer + GEMV only), not S4-S7's best")
    args = parser.parse_args()
    from bench.gpu.fp8_gemm import rotating_graph_us
    from radixlm.kernels.fp8_gemm import per_token_group_quant_fp8_triton as quantize
    from radixlm.kernels.fp8_gemv import default_gemv_config, fp8_gemv

    def layer(gemv, x: torch.Tensor, w: tuple[torch.Tensor, torch.Tensor], **kw) -> torch.Tensor:
        """The decode layer as served: the 128-group quantizer, then the GEMV, both launched with PDL."""
        x_q, x_s = quantize(x, 128, pdl=True)
        return gemv(x_q, x_s, *w, pdl=True, **kw)

    gen = torch.Generator(device="cuda").manual_seed(11)
    print("us per call in CUDA graphs over rotating weight copies (256 MB); TB/s of the weight bytes")
    for name in args.shapes:
        n, k = SHAPES[name]
        weights = []
        for _ in range(max(2, -(-(256 << 20) // (n * k)))):
            w = (torch.randn(n, k, generator=gen, device="cuda", dtype=torch.bfloat16) * 100).clamp_(-448, 448)
            w_s = (0.5 + torch.rand(n, generator=gen, device="cuda")) / (100 * k**0.5)
            weights.append((w.to(torch.float8_e4m3fn), w_s))
        x = torch.randn(1, k, generator=gen, device="cuda", dtype=torch.bfloat16)
        x_q, x_s = quantize(x, 128)
        # The Triton kernel at its default launch (an explicit config keeps fp8_gemv off the Gluon kernel).
        config = default_gemv_config(n, k, torch.cuda.get_device_properties(0).multi_processor_count)
        served = fp8_gemv(x_q, x_s, *weights[0], config=config).float()
        ref = (x_q.float() * x_s.repeat_interleave(128, 1)) @ (weights[0][0].float() * weights[0][1][:, None]).t()
        print(f"{name} N={n} K={k}: served rel err against fp32 {((served - ref).norm() / ref.norm()).item():.2e}",
              flush=True)
        t = rotating_graph_us([lambda w=w: fp8_gemv(x_q, x_s, *w, config=config) for w in weights])
        t_layer = rotating_graph_us([lambda w=w: layer(fp8_gemv, x, w, config=config) for w in weights])
        print(f"  Triton GEMV (fp8_gemv's own kernel)     {t:6.2f} us ({n * k / t / 1e6:.2f} TB/s), quantizer + "
              f"GEMV with PDL {t_layer:6.2f} us", flush=True)
        best = None
        for bn, st, sub, sk, pre in [tuple(Launch()), *(sweep(name) if args.sweep else CONFIGS)]:
            kw = dict(block_n=bn, stages=st, sub=sub, split_k=sk, preload=pre)
            try:
                out = gluon_gemv(x_q, x_s, *weights[0], **kw).float()
                err = ((out - served).norm() / served.norm()).item()
                if args.sweep and (bn, st, sub, sk, pre) != tuple(Launch()):
                    t_layer = rotating_graph_us([lambda w=w: layer(gluon_gemv, x, w, **kw) for w in weights])
                    print(f"  gluon bn={bn:3d} st={st:2d} sub={sub} split={sk} pre={pre:2d}     quantizer + GEMV "
                          f"with PDL {t_layer:6.2f} us; against served {err:.1e}", flush=True)
                    best = min(best or (t_layer, kw), (t_layer, kw), key=lambda b: b[0])
                    continue
                t = rotating_graph_us([lambda w=w: gluon_gemv(x_q, x_s, *w, **kw) for w in weights])
                t_layer = rotating_graph_us([lambda w=w: layer(gluon_gemv, x, w, **kw) for w in weights])
                print(f"  gluon bn={bn:3d} st={st:2d} sub={sub} split={sk} pre={pre:2d}     {t:6.2f} us "
                      f"({n * k / t / 1e6:.2f} TB/s), quantizer + GEMV with PDL {t_layer:6.2f} us; against served "
                      f"{err:.1e}", flush=True)
            except Exception as exc:  # noqa: BLE001 (a config the hardware refuses: report, go on)
                print(f"  gluon {kw}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}", flush=True)
        if best is not None:
            print(f"  best of the sweep at {name}: {best[1]}, {best[0]:.2f} us", flush=True)
        del weights
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
