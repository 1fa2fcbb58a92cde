"""The peer's batch-1 decode: HF transformers ``generate`` with a static KV cache (which transformers compiles
with torch.compile), greedy, on an HF checkpoint directory; prints ms/token after a warm-up.

    python bench/hf_batch1.py --model-path llama-3.1-8b --input-len 128 --output-len 256
"""

from __future__ import annotations

import argparse
import time

import torch
from hf_models import load_hf_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", required=True, help="HF checkpoint directory or a preset name")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--cache", default="static", help="cache_implementation passed to generate")
    args = parser.parse_args()
    model = load_hf_model(args.model_path, torch.bfloat16, "cuda")
    ids = torch.randint(0, model.config.vocab_size, (1, args.input_len), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(0))
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, eos_token_id=None,
                  cache_implementation=args.cache)

    def run(n: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        torch.cuda.synchronize()
        assert out.shape[1] == args.input_len + n
        return time.perf_counter() - start

    start = time.perf_counter()
    run(args.output_len)  # compile and warm up at the timed shapes
    run(args.output_len)
    warm = time.perf_counter() - start
    # Same shapes as the warm-up (a static cache of another length would recompile); the prefill of a short
    # prompt is a few ms of the total, so the mean per new token is within a percent of the decode step.
    long = run(args.output_len)
    per_token = long / args.output_len
    print(f"HF transformers generate, batch 1, cache {args.cache}: {per_token * 1e3:.2f} ms/token = "
          f"{1 / per_token:.1f} tok/s (input {args.input_len}, {args.output_len} new tokens in {long:.2f} s; "
          f"warm-up {warm:.0f} s)")


if __name__ == "__main__":
    main()
