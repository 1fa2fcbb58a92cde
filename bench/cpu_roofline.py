"""The two ceilings of this CPU, measured (memory read bandwidth, the matmul rate at the model's GEMM shapes in
the serving dtype), and the floors they imply for the embedded model's prefill and decode steps.

    python bench/cpu_roofline.py --batch-size 64 --context-len 96 --prefill-tokens 2048 [--dtype float32]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from radixlm.config import ServerArgs
from radixlm.models.loader import resolve_model_config


def best_seconds(fn: Callable[[], object], repeat: int = 5, number: int = 3) -> float:
    """Fastest of ``repeat`` timings of ``number`` calls (a shared machine only ever adds time)."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - start) / number)
    return min(times)


def read_bandwidth(nbytes: int = 1 << 30) -> float:
    x = torch.ones(nbytes // 4)
    return nbytes / best_seconds(lambda: x.sum())


def matmul_rate(rows: int, shapes: list[tuple[int, int]], dtype: torch.dtype) -> float:
    """FLOP/s of ``rows`` x each weight (out, in) in ``dtype``, oneDNN with packed weights, as the engine runs
    them."""
    pairs = []
    for out_features, in_features in shapes:
        w = torch.randn(out_features, in_features).to(dtype)
        pairs.append((torch.randn(rows, in_features).to(dtype), torch.ops.mkldnn._reorder_linear_weight(w, 64)))
    flops = sum(2 * rows * w_shape[0] * w_shape[1] for w_shape in shapes)
    seconds = best_seconds(lambda: [torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "") for x, w in pairs])
    return flops / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--context-len", type=int, default=96, help="mean tokens in KV per request")
    parser.add_argument("--prefill-tokens", type=int, default=2048)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="weights, activations and KV (bf16 pays only on a CPU with bf16 instructions)")
    args = parser.parse_args()
    cfg = resolve_model_config(ServerArgs(model_path=args.model_path, device="cpu", dtype=args.dtype))
    dtype, elem = cfg.dtype, cfg.dtype.itemsize
    h, layers, hd = cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * hd
    layer_shapes = [(qkv, h), (h, cfg.num_attention_heads * hd), (2 * cfg.intermediate_size, h),
                    (h, cfg.intermediate_size)]
    layer_params = sum(o * i for o, i in layer_shapes)
    head_params = cfg.vocab_size * h

    bandwidth = read_bandwidth()
    decode_rate = matmul_rate(args.batch_size, layer_shapes + [(cfg.vocab_size, h)], dtype)
    prefill_rate = matmul_rate(args.prefill_tokens, layer_shapes, dtype)
    print(f"threads {torch.get_num_threads()}, {layers} layers, "
          f"{(layers * layer_params + head_params) / 1e6:.1f} M GEMM parameters (LM head included)")
    print(f"{'ceiling':<46} {'measured':>14}")
    print(f"{'memory read bandwidth':<46} {bandwidth / 1e9:>10.1f} GB/s")
    name = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    print(f"{f'{name} GEMM, {args.batch_size} rows, the model shapes':<46} {decode_rate / 1e9:>8.1f} GFLOP/s")
    print(f"{f'{name} GEMM, {args.prefill_tokens} rows, the layer shapes':<46} {prefill_rate / 1e9:>8.1f} GFLOP/s")

    decode_flops = 2 * args.batch_size * (layers * layer_params + head_params)
    kv_bytes = args.batch_size * args.context_len * layers * 2 * cfg.num_key_value_heads * hd * elem  # K and V
    weight_bytes = elem * (layers * layer_params + head_params)
    decode_floor = max(decode_flops / decode_rate, weight_bytes / bandwidth) + kv_bytes / bandwidth
    prefill_flops = 2 * args.prefill_tokens * layers * layer_params
    print(f"\n{'floor':<46} {'seconds':>14}")
    print(f"{f'decode step, {args.batch_size} x {args.context_len} tokens of context':<46} {decode_floor:>14.4f}"
          f"   ({decode_flops / 1e9:.1f} GFLOP, {kv_bytes / 1e6:.0f} MB of KV)")
    print(f"{f'prefill of {args.prefill_tokens} tokens (GEMMs only)':<46} "
          f"{prefill_flops / prefill_rate:>14.4f}   ({prefill_flops / 1e12:.2f} TFLOP)")


if __name__ == "__main__":
    main()
