"""The two ceilings of this GPU, measured: device-to-device copy bandwidth and bf16 matmul rate, and what they
imply for a model's decode step (the bytes it must read: weights once per step, for MoE models only the experts
hit, and the KV cache).

    python bench/roofline.py --model-path llama-3.1-8b
    python bench/roofline.py --model-path deepseek-v2-lite --batch-size 1 8 64 256 --kv-len 1024
"""

from __future__ import annotations

import argparse

import torch
import triton.testing

from radixlm.config import ServerArgs
from radixlm.layers.moe import FusedMoE
from radixlm.models.loader import resolve_model_config
from radixlm.models.registry import get_model_class


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


def decode_step_bytes(cfg, batch: int, kv_len: int) -> tuple[float, float, float]:
    """(weight bytes, of which routed experts, KV bytes) read by one decode step of ``batch`` requests with
    ``kv_len`` cached tokens each, in the model dtype.  The embedding table is gathered (not streamed); each MoE
    layer reads only the experts its tokens hit: ``E * (1 - (1 - k/E)^batch)`` of ``E`` under uniform routing."""
    model_cls = get_model_class(cfg.architecture)
    with torch.device("meta"):
        model = model_cls(cfg)
    size = torch.finfo(cfg.dtype).bits // 8
    dense = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n) * size
    if cfg.tie_word_embeddings:  # the tied LM head is the embedding, and it is streamed
        dense += cfg.vocab_size * cfg.hidden_size * size
    experts = 0.0
    for m in model.modules():
        if isinstance(m, FusedMoE):
            per_expert = (m.gate_up_proj[0].numel() + m.down_proj[0].numel()) * size
            dense -= per_expert * m.num_experts
            top_k = cfg.hf_config["num_experts_per_tok"]
            experts += per_expert * m.num_experts * (1 - (1 - top_k / m.num_experts) ** batch)
    kv = batch * kv_len * model.kv_cache_spec(cfg.dtype).bytes_per_token()
    return dense + experts, experts, kv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default="llama-3.1-8b")
    parser.add_argument("--json-model-override-args", default="")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1])
    parser.add_argument("--kv-len", type=int, default=0, help="cached tokens per request in the decode step")
    args = parser.parse_args()
    cfg = resolve_model_config(ServerArgs(model_path=args.model_path, load_format="dummy", device="cuda",
                                          dtype="bfloat16", json_model_override_args=args.json_model_override_args))
    bw, rate = copy_bandwidth(), matmul_rate()
    print(f"device {torch.cuda.get_device_name()}: copy {bw / 1e12:.2f} TB/s (read + write), bf16 matmul "
          f"{rate / 1e12:.0f} TFLOP/s")
    print(f"{cfg.model_path}: weights read per decode step (embedding gathered, routed experts as hit under "
          f"uniform routing), KV of {args.kv_len} tokens per request")
    print(f"{'batch':>6s} {'weights GB':>10s} {'experts GB':>10s} {'KV GB':>8s} {'ms/step':>8s} {'tok/s':>9s}")
    for batch in args.batch_size:
        weights, experts, kv = decode_step_bytes(cfg, batch, args.kv_len)
        step = (weights + kv) / bw
        print(f"{batch:6d} {weights / 1e9:10.2f} {experts / 1e9:10.2f} {kv / 1e9:8.2f} {step * 1e3:8.2f} "
              f"{batch / step:9.0f}")


if __name__ == "__main__":
    main()
