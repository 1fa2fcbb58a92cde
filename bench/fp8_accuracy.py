"""What FP8 costs in accuracy: the embedded model (or any) with FP8 weights (``--quantization fp8``) and/or an FP8
KV cache (``--kv-cache-dtype fp8_e4m3``) against the same model without, on the same prompts.

Teacher-forced: every prompt is prefilled, then the reference's greedy continuation is fed token by token through
decode steps (so the KV cache is read as serving reads it); at each position the next-token distributions of the
two are compared: mean KL(reference || FP8) and the share of positions whose argmax agrees.  Free-running: the
share of prompts whose whole greedy continuation is identical.

    python bench/fp8_accuracy.py --num-prompts 64 --output-len 32 --quantization fp8
    python bench/fp8_accuracy.py --num-prompts 64 --output-len 32 --kv-cache-dtype fp8_e4m3
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from radixlm.config import ServerArgs
from radixlm.executor import ModelRunner, ModelWorker
from radixlm.executor.static_batch import decode_batch, extend_batch, generate_static, release
from radixlm.models.loader import resolve_model_config
from radixlm.sampling import SamplingParams

SUBJECTS = ["the moon", "a violin", "photosynthesis", "the Roman empire", "a compiler", "rainforests",
            "chess openings", "the stock market"]
ASKS = ["Explain {} to a child.", "Write two sentences about {}.", "What is the history of {}?",
        "List three facts about {}.", "Why do people care about {}?", "Describe {} in one paragraph.",
        "Give a short poem about {}.", "What would happen without {}?"]


def prompts(tokenizer, n: int) -> list[list[int]]:
    out = []
    for ask, subject in itertools.islice(itertools.product(ASKS, SUBJECTS), n):
        messages = [{"role": "user", "content": ask.format(subject)}]
        out.append(list(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                      return_dict=True)["input_ids"]))
    return out


def make_worker(args: ServerArgs) -> ModelWorker:
    return ModelWorker(ModelRunner(args, resolve_model_config(args)))


def forced_logprobs(worker: ModelWorker, ids: list[list[int]], continuations: list[list[int]]) -> torch.Tensor:
    """[num_prompts, len(continuation), vocab] float32 log-probabilities of the next token after the prompt and
    after each fed continuation token but the last."""
    memory = worker.memory
    rows = memory.req_to_token_pool.alloc(len(ids))
    seq_lens = [len(p) for p in ids]
    steps = len(continuations[0])
    try:
        out = [worker.launch(extend_batch(memory, rows, [0] * len(ids), ids)).logits.next_token_logits.float()]
        for i in range(steps - 1):
            tokens = [c[i] for c in continuations]
            out.append(worker.launch(decode_batch(memory, rows, seq_lens, tokens)).logits.next_token_logits.float())
            seq_lens = [s + 1 for s in seq_lens]
        return torch.stack(out, dim=1).log_softmax(-1).cpu()
    finally:
        release(worker, rows, seq_lens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ServerArgs.add_cli_args(parser)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    args = parser.parse_args()
    test_args = ServerArgs.from_cli_args(args)
    if test_args.quantization is None and test_args.kv_cache_dtype in ("auto", "bfloat16", "float16", "float32"):
        parser.error("nothing to compare: give --quantization fp8 and/or --kv-cache-dtype fp8_e4m3|fp8_e5m2")
    ref_args = test_args.replace(quantization=None, kv_cache_dtype="auto")
    from transformers import AutoTokenizer

    ref = make_worker(ref_args)
    tokenizer = AutoTokenizer.from_pretrained(ref.model_config.model_path)
    ids = prompts(tokenizer, args.num_prompts)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=args.output_len, ignore_eos=True)
    start = time.perf_counter()
    ref_out = generate_static(ref, ids, greedy)
    ref_lp = forced_logprobs(ref, ids, ref_out)
    del ref
    test = make_worker(test_args)
    test_out = generate_static(test, ids, greedy)
    test_lp = forced_logprobs(test, ids, ref_out)
    kl = (ref_lp.exp() * (ref_lp - test_lp)).sum(-1)  # [prompts, positions]
    agree = (ref_lp.argmax(-1) == test_lp.argmax(-1)).float()
    same = sum(a == b for a, b in zip(ref_out, test_out)) / len(ids)
    print(f"model {test_args.model_path or 'embedded'}, dtype {test_args.dtype}, quantization "
          f"{test_args.quantization}, KV {test_args.kv_cache_dtype}; {len(ids)} chat prompts, {args.output_len} "
          f"tokens each ({time.perf_counter() - start:.0f} s)")
    print(f"{'metric':44s} {'value':>10s}")
    print(f"{'mean KL(reference || FP8), nats per token':44s} {kl.mean().item():10.5f}")
    print(f"{'max KL over positions':44s} {kl.max().item():10.5f}")
    print(f"{'teacher-forced argmax agreement':44s} {agree.mean().item():10.2%}")
    print(f"{'identical greedy continuations':44s} {same:10.2%}")


if __name__ == "__main__":
    main()
