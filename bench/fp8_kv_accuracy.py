"""Accuracy of an FP8 KV cache (and, with ``--quantization fp8``, FP8 weights) against a float32 (or the model
dtype's) cache and unquantized weights: same model, same prompts.

The reference cache greedily generates ``--output-len`` tokens for every prompt (one EXTEND of the prompts, then
DECODE steps of the batch).  Then every cache, the reference included, is teacher-forced along those sequences
(DECODE steps feeding the reference's tokens), and its next-token distribution at each generated position is
compared with the reference's:

- ``top-1``: fraction of positions whose argmax equals the reference's (greedy-token agreement);
- ``mean KL`` / ``max KL``: KL(reference || cache) of the next-token distributions, in nats;
- ``same seq``: prompts whose free-running greedy output (the cache's own tokens) equals the reference's whole.

The reference row compares the reference's teacher-forced pass with its own greedy pass (KL 0 and top-1 1 unless
the engine is nondeterministic: a check of the harness).  CPU by
default (the embedded SmolLM2-135M, float32 weights); on a GPU pass ``--device cuda --dtype bfloat16`` and the
reference cache is bf16.

    python bench/fp8_kv_accuracy.py                                  # CPU, embedded model
    python bench/fp8_kv_accuracy.py --quantization fp8 --kv-dtypes auto fp8_e4m3   # FP8 weights, then + FP8 KV
    python bench/fp8_kv_accuracy.py --device cuda --dtype bfloat16 --model-path <path>
"""

from __future__ import annotations

import argparse
import gc
import time
from dataclasses import dataclass

import torch

from radixlm.config import ServerArgs
from radixlm.executor import ModelRunner, ModelWorker
from radixlm.executor.static_batch import decode_batch, extend_batch, release
from radixlm.models.loader import resolve_model_config

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "def fibonacci(n):\n    ",
    "Explain why the sky is blue in one paragraph.",
    "List three prime numbers greater than ten:",
    "Once upon a time, in a small village,",
    "The quick brown fox jumps over the lazy dog. Translate this sentence into French:",
    "Q: What is the boiling point of water at sea level?\nA:",
]

# More prompts than PROMPTS (``--num-prompts``): every template with every subject, in a fixed order.
TEMPLATES = ["Write two sentences about {}.", "What is the most important fact about {}?",
             "Explain {} to a ten-year-old.", "Give three keywords related to {}:", "A short story about {}:",
             "Q: Where does the word '{}' come from?\nA:", "List the pros and cons of {}.",
             "Summarize the history of {} in one paragraph."]
SUBJECTS = ["volcanoes", "the Roman Empire", "photosynthesis", "chess", "the stock market", "honey bees",
            "quantum computing", "jazz", "the Moon", "bicycles", "coffee", "the Internet", "glaciers", "paper",
            "electric cars", "the violin"]


def prompt_texts(n: int) -> list[str]:
    """``n`` prompts: PROMPTS first, then templates filled with subjects."""
    extra = [t.format(s) for s in SUBJECTS for t in TEMPLATES]
    if n > len(PROMPTS) + len(extra):
        raise SystemExit(f"--num-prompts at most {len(PROMPTS) + len(extra)}")
    return (PROMPTS + extra)[:n]


@dataclass
class Accuracy:
    kv_cache_dtype: str
    top1: float  # fraction of teacher-forced positions whose argmax equals the reference's
    mean_kl: float  # nats, over all positions
    max_kl: float
    same_sequences: int  # prompts whose free-running greedy output equals the reference's
    num_prompts: int
    positions: int


def greedy_logits(worker: ModelWorker, prompts: list[list[int]], steps: int,
                  forced: list[list[int]] | None = None) -> tuple[list[list[int]], torch.Tensor]:
    """One EXTEND of ``prompts``, then ``steps - 1`` DECODE steps feeding each step's argmax (free-running greedy)
    or, with ``forced``, the tokens ``forced[i][j]`` (teacher forcing).  Returns the argmax tokens
    [num_prompts][steps] and the float32 next-token logits [num_prompts, steps, vocab] on the host."""
    memory = worker.memory
    n = len(prompts)
    rows = memory.req_to_token_pool.alloc(n)
    seq_lens = [len(p) for p in prompts]
    logits = []
    try:
        batch = extend_batch(memory, rows, [0] * n, prompts)
        for j in range(steps):
            logits.append(worker.launch(batch).logits.next_token_logits.float().cpu())
            if j == steps - 1:
                break
            fed = logits[-1].argmax(-1).tolist() if forced is None else [f[j] for f in forced]
            batch = decode_batch(memory, rows, seq_lens, fed)
            seq_lens = [s + 1 for s in seq_lens]
    finally:
        release(worker, rows, seq_lens)
    stacked = torch.stack(logits, dim=1)
    return stacked.argmax(-1).tolist(), stacked


def make_worker(args: ServerArgs, kv_cache_dtype: str) -> ModelWorker:
    server_args = args.replace(kv_cache_dtype=kv_cache_dtype)
    return ModelWorker(ModelRunner(server_args, resolve_model_config(server_args)))


def compare(name: str, ref_tokens: list[list[int]], ref_logits: torch.Tensor, logits: torch.Tensor,
            free_running: list[list[int]] | None) -> Accuracy:
    """``logits`` (teacher-forced along ``ref_tokens``) against the reference's."""
    ref_logp, logp = ref_logits.log_softmax(-1), logits.log_softmax(-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)  # [num_prompts, steps]
    top1 = (logp.argmax(-1) == ref_logp.argmax(-1)).float().mean().item()
    same = -1 if free_running is None else sum(a == b for a, b in zip(free_running, ref_tokens))
    return Accuracy(name, top1, kl.mean().item(), kl.max().item(), same, len(ref_tokens), kl.numel())


def measure(args: ServerArgs, prompts: list[list[int]], output_len: int, reference_dtype: str,
            kv_dtypes: list[str], free_running: bool = True) -> list[Accuracy]:
    """Each of ``kv_dtypes`` against ``reference_dtype``'s cache (the first row: the reference against itself);
    without ``free_running`` the FP8 caches skip their own greedy run (``same_sequences`` is then -1)."""
    worker = make_worker(args.replace(quantization=None, quantize_lm_head=False), reference_dtype)  # unquantized
    ref_tokens, ref_logits = greedy_logits(worker, prompts, output_len)
    results = [compare(reference_dtype, ref_tokens, ref_logits,
                       greedy_logits(worker, prompts, output_len, forced=ref_tokens)[1], ref_tokens)]
    for name in kv_dtypes:
        del worker
        gc.collect()
        worker = make_worker(args, name)
        own = greedy_logits(worker, prompts, output_len)[0] if free_running else None
        logits = greedy_logits(worker, prompts, output_len, forced=ref_tokens)[1]
        label = name + (f" + {args.quantization} weights" if args.quantization else "") + (
            " + FP8 head" if args.quantize_lm_head else "")
        results.append(compare(label, ref_tokens, ref_logits, logits, own))
    return results


def table(results: list[Accuracy]) -> str:
    lines = [f"{'kv cache':22s} {'top-1':>7s} {'mean KL':>10s} {'max KL':>10s} {'same seq':>9s} {'positions':>9s}"]
    for r in results:
        lines.append(f"{r.kv_cache_dtype:22s} {r.top1:7.4f} {r.mean_kl:10.2e} {r.max_kl:10.2e} "
                     f"{r.same_sequences:>4d}/{r.num_prompts:<4d} {r.positions:9d}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ServerArgs.add_cli_args(parser)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--num-prompts", type=int, default=len(PROMPTS))
    parser.add_argument("--reference-kv-dtype", default="auto",
                        help="the reference cache (auto: float32 on CPU, the model dtype on GPU)")
    parser.add_argument("--kv-dtypes", nargs="+", default=["fp8_e4m3", "fp8_e5m2"])
    cli = parser.parse_args()
    args = ServerArgs.from_cli_args(cli)
    if not cli.model_path:
        from radixlm.models.embedded import embedded_model_path

        args = args.replace(model_path=embedded_model_path())
    if args.max_total_tokens is None:  # a few thousand tokens are needed; a default-sized pool is slow to zero
        args = args.replace(max_total_tokens=8192)
    if args.device == "cpu" and cli.reference_kv_dtype == "auto":
        cli.reference_kv_dtype = "float32"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    prompts = [tokenizer(p).input_ids for p in prompt_texts(cli.num_prompts)]
    start = time.perf_counter()
    results = measure(args, prompts, cli.output_len, cli.reference_kv_dtype, cli.kv_dtypes)
    print(f"{args.model_path}: {len(prompts)} prompts x {cli.output_len} tokens, device {args.device}, dtype "
          f"{args.dtype}, attention {args.attention_backend}, reference cache {cli.reference_kv_dtype} "
          f"({time.perf_counter() - start:.1f} s)")
    print(table(results))


if __name__ == "__main__":
    main()
