"""Accuracy of ``--enable-fp8-mla-bmm`` (DeepSeek's absorbed W_UK / W_UV products in FP8) against the same model
with the products in the model dtype: same weights, same prompts.

The flag-off model greedily generates ``--output-len`` tokens for every prompt (one EXTEND of the prompts, which
runs the absorbed form at these sizes, then DECODE steps of the batch); then both models are teacher-forced along
those sequences and their next-token distributions compared at every generated position
(``fp8_kv_accuracy.greedy_logits`` / ``compare``):

- ``top-1``: fraction of positions whose argmax equals the reference's (greedy-token agreement);
- ``mean KL`` / ``max KL``: KL(reference || fp8) of the next-token distributions, in nats;
- ``mean rel`` / ``max rel``: ||logits - reference|| / ||reference|| per position;
- ``same seq``: prompts whose free-running greedy output equals the reference's whole.

The reference row compares the flag-off model's teacher-forced pass with its own greedy pass (0 and 1 unless the
engine is nondeterministic: a check of the harness).  Prompts are random token ids (dummy weights have no
tokenizer).  Without ``--model-path``: DeepSeek-V2-Lite and DeepSeek-V3 shrunk for a CPU (dummy weights; MLA's
dims as the real models': latent 512, rope 64, nope 128, v 128; fewer heads, layers and experts, a smaller
hidden size and vocabulary).  Random weights give flat next-token distributions, so top-1 counts near-ties; the
KL and relative errors are the measure.

    python bench/mla_fp8_bmm_accuracy.py                                     # CPU, the two shrunk models
    python bench/mla_fp8_bmm_accuracy.py --device cuda --dtype bfloat16 --model-path deepseek-v2-lite \\
        --load-format dummy                                                  # GPU, the real V2-Lite shapes
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/, for fp8_kv_accuracy
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo

from fp8_kv_accuracy import Accuracy, compare, greedy_logits  # noqa: E402

from radixlm.config import ServerArgs  # noqa: E402
from radixlm.executor import ModelRunner, ModelWorker  # noqa: E402
from radixlm.models.loader import resolve_model_config  # noqa: E402

_SHRUNK = dict(num_hidden_layers=3, first_k_dense_replace=1, hidden_size=256, intermediate_size=512,
               moe_intermediate_size=64, n_routed_experts=8, num_experts_per_tok=2, num_attention_heads=8,
               num_key_value_heads=8, vocab_size=8192, bos_token_id=0, eos_token_id=1)
CPU_MODELS = {  # preset -> overrides
    "deepseek-v2-lite": _SHRUNK,
    "deepseek-v3": dict(_SHRUNK, n_group=4, topk_group=2, q_lora_rank=256),
}


@dataclass
class Row:
    accuracy: Accuracy
    mean_rel: float  # mean over positions of ||logits - reference|| / ||reference||
    max_rel: float


def make_worker(args: ServerArgs) -> ModelWorker:
    return ModelWorker(ModelRunner(args, resolve_model_config(args)))


def row(name: str, ref_tokens: list[list[int]], ref_logits: torch.Tensor, logits: torch.Tensor,
        free_running: list[list[int]]) -> Row:
    rel = (logits - ref_logits).norm(dim=-1) / ref_logits.norm(dim=-1)  # [num_prompts, steps]
    return Row(compare(name, ref_tokens, ref_logits, logits, free_running), rel.mean().item(), rel.max().item())


def measure(args: ServerArgs, prompts: list[list[int]], output_len: int) -> list[Row]:
    """The flag-off model against itself (harness check), then the flag-on model against it."""
    worker = make_worker(args.replace(enable_fp8_mla_bmm=False))
    ref_tokens, ref_logits = greedy_logits(worker, prompts, output_len)
    rows = [row("products in model dtype", ref_tokens, ref_logits,
                greedy_logits(worker, prompts, output_len, forced=ref_tokens)[1], ref_tokens)]
    del worker
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    worker = make_worker(args.replace(enable_fp8_mla_bmm=True))
    own = greedy_logits(worker, prompts, output_len)[0]
    rows.append(row("FP8 products", ref_tokens, ref_logits,
                    greedy_logits(worker, prompts, output_len, forced=ref_tokens)[1], own))
    return rows


def random_prompts(n: int, min_len: int, max_len: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(min_len, max_len + 1, (n,), generator=gen).tolist()
    return [torch.randint(2, vocab, (k,), generator=gen).tolist() for k in lens]


def table(rows: list[Row]) -> str:
    lines = [f"{'MLA products':24s} {'top-1':>7s} {'mean KL':>10s} {'max KL':>10s} {'mean rel':>9s} {'max rel':>9s} "
             f"{'same seq':>9s} {'positions':>9s}"]
    for r in rows:
        a = r.accuracy
        lines.append(f"{a.kv_cache_dtype:24s} {a.top1:7.4f} {a.mean_kl:10.2e} {a.max_kl:10.2e} {r.mean_rel:9.2e} "
                     f"{r.max_rel:9.2e} {a.same_sequences:>4d}/{a.num_prompts:<4d} {a.positions:9d}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ServerArgs.add_cli_args(parser)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=[8, 64], metavar=("MIN", "MAX"))
    parser.add_argument("--output-len", type=int, default=16)
    cli = parser.parse_args()
    base = ServerArgs.from_cli_args(cli)
    if cli.random_seed is None:  # the same prompts and weights every run
        base = base.replace(random_seed=0)
    if base.max_total_tokens is None:  # a few thousand tokens are needed; a default-sized pool is slow to zero
        base = base.replace(max_total_tokens=8192)
    if cli.model_path:
        runs = [base]
    else:
        runs = [base.replace(model_path=name, load_format="dummy", skip_tokenizer_init=True,
                             json_model_override_args=json.dumps(overrides)) for name, overrides in CPU_MODELS.items()]
    for args in runs:
        vocab = resolve_model_config(args).vocab_size
        prompts = random_prompts(cli.num_prompts, *cli.prompt_len, vocab, args.random_seed)
        start = time.perf_counter()
        rows = measure(args, prompts, cli.output_len)
        shrunk = " (shrunk)" if args.json_model_override_args else ""
        print(f"\n{args.model_path}{shrunk}: {len(prompts)} prompts of {cli.prompt_len[0]}-{cli.prompt_len[1]} "
              f"tokens x {cli.output_len} generated, device {args.device}, dtype {args.dtype}, attention "
              f"{args.attention_backend} ({time.perf_counter() - start:.1f} s)")
        print(table(rows))


if __name__ == "__main__":
    main()
