"""Tensor parallelism checked end to end: greedy outputs of real prompts through the Engine at one TP size, saved,
or compared with a reference saved at another size.  Seeded dummy weights do not depend on the TP size (each full
tensor is generated before it is sharded), so both runs hold the same model.

Where two runs part, the table shows the reference's gap between its two most likely tokens at that position:
a near-tie can flip under another summation order (the all-reduce adds partial sums in a different order than
one GPU does), which is rounding, not a sharding bug; a sharding bug shows up as large logprob differences from
the first token on.

    python bench/tp_parity.py --model-path llama-3.1-8b --load-format dummy --tokenizer-path DIR --tp-size 1 \
        --out tp1.json
    python bench/tp_parity.py --model-path llama-3.1-8b --load-format dummy --tokenizer-path DIR --tp-size 2 \
        --reference tp1.json
"""

from __future__ import annotations

import argparse
import json
import time

from radixlm.config import ServerArgs
from radixlm.engine.engine import Engine

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def quicksort(items):",
    "Explain in one sentence why the sky is blue.",
    "Translate to German: Good morning, how are you?",
    "List the first ten prime numbers:",
    "Once upon a time, in a small village by the mountains,",
    "SELECT name, age FROM users WHERE",
    "The three laws of thermodynamics are",
    "A recipe for pancakes needs",
    "Q: What is 17 times 23?\nA:",
    "import torch\nimport torch.nn as nn\n\nclass MLP(nn.Module):",
]


def run(engine: Engine, max_new_tokens: int) -> list[dict]:
    params = {"max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True}
    outs = engine.generate(PROMPTS, params, return_logprob=True, top_logprobs_num=2)
    results = []
    for out in outs:
        meta = out["meta_info"]
        results.append({
            "ids": out["output_ids"],
            "logprobs": [lp for lp, _, _ in meta["output_token_logprobs"]],
            "top2": [[lp for lp, _, _ in top] for top in meta["output_top_logprobs"]],
        })
    return results


def compare(ref: list[dict], new: list[dict]) -> int:
    """Prints one row per prompt; returns how many prompts produced identical tokens."""
    print(f"{'prompt':>6} {'identical':>9} {'first diff':>10} {'ref top-2 gap there':>20} "
          f"{'max |d logprob| before':>23}")
    same = 0
    for i, (r, n) in enumerate(zip(ref, new)):
        k = next((j for j, (a, b) in enumerate(zip(r["ids"], n["ids"])) if a != b), None)
        common = len(r["ids"]) if k is None else k
        delta = max((abs(a - b) for a, b in zip(r["logprobs"][:common], n["logprobs"][:common])), default=0.0)
        gap = "" if k is None else f"{r['top2'][k][0] - r['top2'][k][1]:.4f}"
        same += k is None
        print(f"{i:>6} {str(k is None):>9} {'' if k is None else k:>10} {gap:>20} {delta:>23.2e}")
    return same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ServerArgs.add_cli_args(parser)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", help="save the outputs here (JSON)")
    parser.add_argument("--reference", help="compare with outputs saved by --out")
    parser.set_defaults(random_seed=0)  # the same dummy weights in both runs
    args = parser.parse_args()
    server_args = ServerArgs.from_cli_args(args)
    start = time.perf_counter()
    with Engine(**vars(server_args)) as engine:
        loaded = time.perf_counter()
        results = run(engine, args.max_new_tokens)
    print(f"tp_size {server_args.tp_size}, dtype {server_args.dtype}: {len(PROMPTS)} prompts x "
          f"{args.max_new_tokens} tokens; engine start {loaded - start:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"tp_size": server_args.tp_size, "dtype": server_args.dtype, "results": results}, f)
    if args.reference:
        with open(args.reference) as f:
            ref = json.load(f)
        same = compare(ref["results"], results)
        print(f"tp_size {server_args.tp_size} vs {ref['tp_size']} ({server_args.dtype}): {same}/{len(PROMPTS)} "
              "prompts with identical greedy tokens")


if __name__ == "__main__":
    main()
