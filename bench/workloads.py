"""SGLang-style synthetic workloads shared by the offline and the serving benchmark.

Datasets (token lengths drawn uniformly from [max(1, ratio * L), L], seeded):
  random-ids              random token ids
  random                  random token ids decoded to text (the server tokenizes it again)
  generated-shared-prefix groups x prompts-per-group; each group shares a system prompt, each prompt adds a
                          question (all random tokens)
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", choices=["random", "random-ids", "generated-shared-prefix"], default="random-ids")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--random-input-len", type=int, default=256)
    parser.add_argument("--random-output-len", type=int, default=64)
    parser.add_argument("--random-range-ratio", type=float, default=1.0)
    parser.add_argument("--gsp-num-groups", type=int, default=4)
    parser.add_argument("--gsp-prompts-per-group", type=int, default=16)
    parser.add_argument("--gsp-system-prompt-len", type=int, default=512)
    parser.add_argument("--gsp-question-len", type=int, default=32)
    parser.add_argument("--gsp-output-len", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)


@dataclass
class Workload:
    prompts: list[list[int]]  # token ids
    output_lens: list[int]
    texts: list[str] | None = None  # set for the `random` dataset


def _lens(rng: random.Random, n: int, length: int, ratio: float) -> list[int]:
    return [rng.randint(max(1, int(length * ratio)), length) for _ in range(n)]


def make_workload(args: argparse.Namespace, vocab_size: int, tokenizer) -> Workload:
    rng = random.Random(args.seed)
    special = set(getattr(tokenizer, "all_special_ids", []))
    low = max(special) + 1 if special else 0

    def ids(n: int) -> list[int]:
        return [rng.randrange(low, vocab_size) for _ in range(n)]

    if args.dataset in ("random", "random-ids"):
        ins = _lens(rng, args.num_prompts, args.random_input_len, args.random_range_ratio)
        outs = _lens(rng, args.num_prompts, args.random_output_len, args.random_range_ratio)
        prompts = [ids(n) for n in ins]
        if args.dataset == "random":
            texts = [tokenizer.decode(p) for p in prompts]
            return Workload([tokenizer(t).input_ids for t in texts], outs, texts)
        return Workload(prompts, outs)
    prompts, outs = [], []
    for _ in range(args.gsp_num_groups):
        system = ids(args.gsp_system_prompt_len)
        for _ in range(args.gsp_prompts_per_group):
            prompts.append(system + ids(args.gsp_question_len))
            outs.append(args.gsp_output_len)
    order = list(range(len(prompts)))
    rng.shuffle(order)
    return Workload([prompts[i] for i in order], [outs[i] for i in order])
