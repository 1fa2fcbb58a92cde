"""KV-cache capacity of an MLA model against an MHA model of the same shape: bytes per token and the tokens that
fit in a given pool.  DeepSeek's MLA stores one latent (kv_lora_rank) + one rotary key per token and layer for all
heads; the MHA model with the same layers, heads and head dims stores K and V of every head.

    python bench/kv_capacity.py --model-path deepseek-v2-lite --pool-gb 40
"""

from __future__ import annotations

import argparse

import torch

from radixlm.config import ServerArgs
from radixlm.mem import KVCacheSpec
from radixlm.models.loader import resolve_model_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default="deepseek-v2-lite")
    parser.add_argument("--pool-gb", type=float, default=40.0, help="bytes given to the KV pool")
    args = parser.parse_args()
    cfg = resolve_model_config(ServerArgs(model_path=args.model_path, load_format="dummy", device="cpu",
                                          dtype="bfloat16"))
    hf, layers = cfg.hf_config, cfg.num_hidden_layers
    mla = KVCacheSpec.mla(layers, hf["kv_lora_rank"], hf["qk_rope_head_dim"], torch.bfloat16)
    # the MHA form of the same attention: every head's key (nope + rope dims) and value
    mha = KVCacheSpec.mha(layers, cfg.num_attention_heads, hf["qk_nope_head_dim"] + hf["qk_rope_head_dim"],
                          torch.bfloat16, v_head_dim=hf["v_head_dim"])
    # and a Llama-style GQA model of the same hidden size (8 KV heads of hidden/heads dims), for scale
    gqa = KVCacheSpec.mha(layers, 8, cfg.hidden_size // cfg.num_attention_heads, torch.bfloat16)
    pool = args.pool_gb * 1e9
    print(f"{args.model_path}: {layers} layers, {cfg.num_attention_heads} heads, bf16 KV, {args.pool_gb:g} GB pool")
    print(f"{'layout':44s} {'bytes/token':>12s} {'tokens':>12s} {'vs MLA':>7s}")
    for name, spec in (("MLA latent (kv_lora_rank + rope key)", mla),
                       ("MHA, same heads (K 192 + V 128 per head)", mha),
                       ("GQA, 8 KV heads of hidden/heads", gqa)):
        per = spec.bytes_per_token()
        print(f"{name:44s} {per:12,d} {int(pool // per):12,d} {mla.bytes_per_token() / per:7.3f}")


if __name__ == "__main__":
    main()
