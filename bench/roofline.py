"""The two ceilings of this GPU, measured: device-to-device copy bandwidth and bf16 matmul rate, and what they
imply for a model's decode step (weights read once per step).

    python bench/roofline.py --model-path llama-3.1-8b
"""

from __future__ import annotations

import argparse

import torch
import triton.testing

from radixlm.config import ServerArgs
from radixlm.models.loader import resolve_model_config


def copy_bandwidth(nbytes: int = 4 << 30) -> float:
    """Bytes read plus bytes written per second by a large device-to-device copy."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=500, return_mode="median")
    return 2 * nbytes / (ms * 1e-3)


def matmul_rate(n: int = 8192) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=500, return_mode="median")
    return 2 * n**3 / (ms * 1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default="llama-3.1-8b")
    args = parser.parse_args()
    cfg = resolve_model_config(ServerArgs(model_path=args.model_path, load_format="dummy", device="cuda",
                                          dtype="bfloat16"))
    h, i, layers, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    params = layers * (h * qkv + cfg.num_attention_heads * cfg.head_dim * h + 3 * h * i + 2 * h) + 2 * v * h + h
    weight_bytes = params * 2
    bw, rate = copy_bandwidth(), matmul_rate()
    print(f"device {torch.cuda.get_device_name()}: copy {bw / 1e12:.2f} TB/s (read + write), bf16 matmul "
          f"{rate / 1e12:.0f} TFLOP/s")
    print(f"{cfg.model_path}: {params / 1e9:.2f} B parameters, {weight_bytes / 1e9:.2f} GB of bf16 weights "
          f"(embedding included: it is not read in decode, the LM head is)")
    decode_bytes = weight_bytes - v * h * 2  # the embedding table is gathered, not streamed
    print(f"batch-1 decode floor: {decode_bytes / bw * 1e3:.2f} ms/step -> {bw / decode_bytes:.0f} tok/s")


if __name__ == "__main__":
    main()
