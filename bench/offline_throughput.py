"""Offline throughput of the Engine on SGLang-style synthetic datasets, optionally next to HF transformers.

    python bench/offline_throughput.py --dataset random-ids --num-prompts 64 \
        --random-input-len 256 --random-output-len 64 --random-range-ratio 1.0 --hf

Datasets: see bench/workloads.py.
--hf times transformers on the same prompts: ``generate_batch`` (its continuous batching) for all, and
``generate`` one prompt at a time for --hf-generate-prompts of them (extrapolated per request).
--repeat N reports the median of N runs of radixlm and of HF continuous batching (this shared 2-core machine
varies by +-15 % between runs of one command).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from workloads import Workload, add_workload_args, make_workload

from radixlm.config import ServerArgs
from radixlm.engine.engine import Engine


def run_engine(engine: Engine, work: Workload) -> dict[str, float]:
    params = [{"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True} for n in work.output_lens]
    start = time.perf_counter()
    if work.texts is not None:
        outs = engine.generate(work.texts, params)
    else:
        outs = engine.generate(input_ids=work.prompts, sampling_params=params)
    elapsed = time.perf_counter() - start
    prompt = sum(o["meta_info"]["prompt_tokens"] for o in outs)
    cached = sum(o["meta_info"]["cached_tokens"] for o in outs)
    completion = sum(o["meta_info"]["completion_tokens"] for o in outs)
    return {"seconds": elapsed, "requests": len(outs), "input": prompt, "output": completion,
            "cache_hit_rate": cached / max(prompt, 1)}


def run_hf_generate_batch(model, work: Workload) -> dict[str, float]:
    """transformers' continuous batching (``generate_batch``'s manager), each request with its own length."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max(work.output_lens), do_sample=False, eos_token_id=None,
                              pad_token_id=0)
    manager = model.init_continuous_batching(generation_config=config)
    manager.start()
    start = time.perf_counter()
    for i, (ids, n) in enumerate(zip(work.prompts, work.output_lens)):
        # eos -1: never stop early, as radixlm's ignore_eos (random weights would hit EOS now and then)
        manager.add_request(ids, request_id=f"req{i}", max_new_tokens=n, eos_token_id=-1)
    done = output = 0
    while done < len(work.prompts):
        result = manager.get_result(timeout=1)
        if result is None:
            if not manager.is_running():
                raise RuntimeError("transformers' continuous batching stopped before finishing")
            continue
        done += 1
        output += len(result.generated_tokens)
    elapsed = time.perf_counter() - start
    manager.stop(block=True)
    return {"seconds": elapsed, "requests": done, "input": sum(map(len, work.prompts)), "output": output,
            "cache_hit_rate": 0.0}


def median_run(repeat: int, run: Callable[[], dict[str, float]],
               between: Callable[[], object] | None = None) -> dict[str, Any]:
    """``run`` ``repeat`` times (``between`` before every run but the first); the median run by seconds, with
    every run's seconds under ``runs``."""
    results = []
    for i in range(max(1, repeat)):
        if i and between is not None:
            between()
        results.append(run())
    results.sort(key=lambda r: r["seconds"])
    return {**results[len(results) // 2], "runs": [r["seconds"] for r in results]}


def run_hf_generate(model, work: Workload, count: int) -> dict[str, float]:
    count = min(count, len(work.prompts))
    start = time.perf_counter()
    output = 0
    with torch.no_grad():
        for ids, n in zip(work.prompts[:count], work.output_lens[:count]):
            out = model.generate(torch.tensor([ids], device=model.device),
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=model.device),
                                 max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
            output += out.shape[1] - len(ids)
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "requests": count, "input": sum(map(len, work.prompts[:count])), "output": output,
            "cache_hit_rate": 0.0}


def run_hf_generate_padded(model, work: Workload) -> dict[str, float]:
    """All prompts in one ``generate`` call, left-padded: transformers' static batching, for models its
    continuous batching does not serve (DeepSeek's MLA cache).  Every row decodes the longest output; the
    requested lengths are what counts as output."""
    ids = work.prompts
    longest = max(map(len, ids))
    pad = 0
    batch = torch.tensor([[pad] * (longest - len(p)) + p for p in ids], device=model.device)
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in ids], device=model.device)
    n = max(work.output_lens)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(batch, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=pad, eos_token_id=None)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == longest + n
    return {"seconds": elapsed, "requests": len(ids), "input": sum(map(len, ids)), "output": sum(work.output_lens),
            "cache_hit_rate": 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ServerArgs.add_cli_args(parser)
    add_workload_args(parser)
    parser.add_argument("--hf", action="store_true", help="also time HF transformers on the same prompts")
    parser.add_argument("--hf-generate-prompts", type=int, default=4)
    parser.add_argument("--hf-padded-batch", action="store_true",
                        help="also time HF generate on all prompts at once, left-padded (static batching)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="time radixlm and HF continuous batching this many times each (radix cache flushed "
                             "between runs) and report the median run, with the range of the seconds")
    args = parser.parse_args()
    server_args = ServerArgs.from_cli_args(args)

    rows = []
    with Engine(**vars(server_args)) as engine:
        work = make_workload(args, engine.info.vocab_size, engine.tokenizer)
        engine.generate(input_ids=work.prompts[0][:16], sampling_params={"max_new_tokens": 2})  # warm-up
        engine.generate(input_ids=[[1, 2, 3]], sampling_params={"max_new_tokens": 1})
        rows.append(("radixlm Engine", median_run(args.repeat, lambda: run_engine(engine, work), engine.flush_cache)))
        model_path = engine.server_args.model_path
    if args.hf:
        from hf_models import load_hf_model

        from radixlm.models.embedded import embedded_model_path

        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
            server_args.dtype, torch.float32 if server_args.device == "cpu" else torch.bfloat16)
        model = load_hf_model(model_path or embedded_model_path(), dtype, server_args.device)
        peers = [("HF continuous batching", lambda: median_run(args.repeat, lambda: run_hf_generate_batch(model, work)))]
        if args.hf_padded_batch:
            peers.append(("HF generate, one padded batch", lambda: run_hf_generate_padded(model, work)))
        if args.hf_generate_prompts > 0:
            peers.append((f"HF generate x{min(args.hf_generate_prompts, len(work.prompts))} (sequential)",
                          lambda: run_hf_generate(model, work, args.hf_generate_prompts)))
        for name, run in peers:
            try:  # a peer path the model does not support is reported, not fatal to the table
                rows.append((name, run()))
            except Exception as e:
                print(f"{name} failed: {type(e).__name__}: {str(e)[:300]}")

    print(f"\ndataset {args.dataset}, {len(work.prompts)} prompts, input tokens {sum(map(len, work.prompts))}, "
          f"output tokens {sum(work.output_lens)}, device {server_args.device}")
    print(f"{'system':<34} {'seconds':>8} {'req/s':>7} {'input tok/s':>12} {'output tok/s':>13} {'cache hit':>9}"
          f"  {'runs (s)':<20}")
    for name, r in rows:
        s = r["seconds"]
        runs = ", ".join(f"{t:.2f}" for t in r.get("runs", [s]))
        print(f"{name:<34} {s:>8.2f} {r['requests'] / s:>7.2f} {r['input'] / s:>12.1f} {r['output'] / s:>13.1f} "
              f"{r['cache_hit_rate']:>9.1%}  {runs:<20}")


if __name__ == "__main__":
    main()
