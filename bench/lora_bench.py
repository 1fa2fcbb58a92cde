"""Cost of serving LoRA adapters: decode ms/step and prefill time with 1..N distinct adapters in a batch against
base-only rows, and the cost of a cold adapter load.  No scheduler, no server (like bench/one_batch.py).

Adapters are random PEFT directories for the model's shapes (all seven projections, one per rank asked for),
written once under --adapter-dir; a batch of B rows with n adapters gives row i the adapter i % n (n = 0: every
row base-only).  ``base (LoRA off)`` is the same batch on a worker started without --enable-lora.

    python bench/lora_bench.py --model-path llama-3.1-8b --load-format dummy --ranks 16 64 \
        --num-adapters 0 1 4 16 --batch-size 1 32 128 --input-len 256 --output-len 32

``--offline-prompts N`` also times the ``Engine`` (scheduler, radix cache, CUDA graphs) on N random prompts of
--input-len tokens and --output-len outputs, prompt i under adapter i % n of the first rank's adapters, against
the same prompts on an Engine without LoRA: the issue's offline throughput.

The pool has max(--max-loras-per-batch, the largest --num-adapters) slots at --max-lora-rank (default: the
largest --ranks): a rank-16 adapter in a rank-64 pool reads only its 16 columns.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch
from safetensors.torch import save_file

from radixlm.config import ModelConfig, ServerArgs
from radixlm.executor import ModelRunner, ModelWorker
from radixlm.executor.static_batch import decode_batch, extend_batch, release
from radixlm.lora.adapter import CONFIG_FILE, SUPPORTED_MODULES, WEIGHTS_FILE, projection_shape
from radixlm.models.loader import resolve_model_config


def write_random_adapter(directory: str, cfg: ModelConfig, rank: int, seed: int) -> str:
    """A PEFT adapter of ``rank`` on every projection of every layer, bf16 values of a realistic size (A ~ 1/sqrt(in),
    B ~ 1e-3), in ``directory``; written once (an existing one is reused)."""
    if os.path.exists(os.path.join(directory, WEIGHTS_FILE)):
        return directory
    os.makedirs(directory, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg.num_hidden_layers):
        for module in SUPPORTED_MODULES:
            out_f, in_f = projection_shape(cfg, module)
            block = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, in_f, generator=g) * in_f**-0.5).bfloat16()
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(out_f, rank, generator=g) * 1e-3).bfloat16()
    save_file(tensors, os.path.join(directory, WEIGHTS_FILE))
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(SUPPORTED_MODULES),
                   "bias": "none"}, f)
    return directory


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_batch(worker: ModelWorker, names: list[str | None], input_len: int, output_len: int) -> tuple[float, float]:
    """(prefill seconds, mean decode seconds per step) of one static batch whose row i runs adapter ``names[i]``;
    decode steps chained on the device as in bench/one_batch.py."""
    bs = len(names)
    lora_names = names if any(n is not None for n in names) else None
    g = torch.Generator().manual_seed(bs * 7919 + input_len)
    prompts = torch.randint(0, worker.model_config.vocab_size, (bs, input_len), generator=g).tolist()
    memory = worker.memory
    rows = memory.req_to_token_pool.alloc(bs)
    seq_lens = [input_len] * bs
    previous = [-(i + 1) for i in range(bs)]
    try:
        _sync(worker.device)
        start = time.perf_counter()
        worker.run(dataclasses.replace(extend_batch(memory, rows, [0] * bs, prompts), lora_names=lora_names))
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(output_len):
            batch = dataclasses.replace(decode_batch(memory, rows, seq_lens, previous), lora_names=lora_names)
            pending = worker.sample(worker.launch(batch))
            seq_lens = [s + 1 for s in seq_lens]
        pending.result()
        return prefill, (time.perf_counter() - start) / max(output_len, 1)
    finally:
        release(worker, rows, seq_lens)


def timed_batch(worker: ModelWorker, names: list[str | None], input_len: int, output_len: int,
                repeat: int) -> tuple[float, float]:
    """Best of ``repeat`` runs after one untimed run of the shape (Triton specialises on sizes)."""
    run_batch(worker, names, input_len, 2)
    runs = [run_batch(worker, names, input_len, output_len) for _ in range(repeat)]
    return min(r[0] for r in runs), min(r[1] for r in runs)


def cold_load(worker: ModelWorker, name: str, path: str) -> tuple[float, float]:
    """(seconds to read and check the adapter into host memory, seconds of the first decode step that makes it
    resident minus a warm step of the same batch)."""
    t = time.perf_counter()
    worker.load_lora_adapter(name, path)
    load = time.perf_counter() - t
    _, first = run_batch(worker, [name], 16, 1)
    _, warm = run_batch(worker, [name], 16, 1)
    return load, first - warm


def time_base(base_args: ServerArgs, cfg: ModelConfig, batch_sizes: list[int], input_len: int, output_len: int,
              repeat: int) -> dict[int, tuple[float, float]]:
    """Batch size -> (prefill s, decode s/step) on a worker without LoRA."""
    worker = ModelWorker(ModelRunner(base_args.replace(enable_lora=False), cfg))
    run_batch(worker, [None], 16, 2)
    return {bs: timed_batch(worker, [None] * bs, input_len, output_len, repeat) for bs in batch_sizes}


def run_offline(base_args: ServerArgs, path: str, rank: int, counts: list[int], num_prompts: int, input_len: int,
                output_len: int, repeat: int) -> list[tuple[str, float, float]]:
    """(configuration, best seconds of ``repeat`` runs, output tok/s) of the Engine on ``num_prompts`` random
    prompts: without LoRA, then with ``max(counts)`` names for the adapter at ``path`` and prompt i under name
    i % n for each n in ``counts`` (0: all base)."""
    from radixlm.engine.engine import Engine

    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, 30000, (num_prompts, input_len), generator=g).tolist()
    params = {"max_new_tokens": output_len, "temperature": 0.0, "ignore_eos": True}
    slots = max(max(counts), 1)
    names = [f"r{rank}-{i}" for i in range(slots)]
    rows = []

    def timed(engine: Engine, label: str, lora_path: list[str | None] | None) -> None:
        best = float("inf")
        for _ in range(repeat):  # the radix cache flushed before each run: no run reuses another's prompts
            engine.flush_cache()
            start = time.perf_counter()
            outs = engine.generate(input_ids=prompts, sampling_params=params, lora_path=lora_path)
            best = min(best, time.perf_counter() - start)
        rows.append((label, best, sum(o["meta_info"]["completion_tokens"] for o in outs) / best))

    common = dict(vars(base_args), skip_tokenizer_init=True)
    with Engine(**{**common, "enable_lora": False, "lora_paths": None}) as engine:
        engine.generate(input_ids=prompts[:2], sampling_params=params)  # warm-up
        timed(engine, "Engine, LoRA off", None)
    lora_paths = tuple(f"{n}={path}" for n in names)
    with Engine(**{**common, "enable_lora": True, "lora_paths": lora_paths, "max_loras_per_batch": slots,
                   "max_lora_rank": rank}) as engine:
        engine.generate(input_ids=prompts[:2], sampling_params=params, lora_path=names[:2])  # warm-up
        for n in counts:
            label = "Engine, base rows (LoRA on)" if n == 0 else f"Engine, rank {rank}, {n} adapter{'s' * (n > 1)}"
            timed(engine, label, [names[i % n] if n else None for i in range(num_prompts)])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ServerArgs.add_cli_args(parser)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--num-adapters", type=int, nargs="+", default=[0, 1, 4, 16])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--adapter-dir", default=os.path.join(tempfile.gettempdir(), "radixlm-bench-adapters"))
    parser.add_argument("--skip-base", action="store_true", help="do not time the LoRA-disabled worker")
    parser.add_argument("--offline-prompts", type=int, default=0, help="also time the Engine on this many prompts")
    parser.add_argument("--skip-steps", action="store_true", help="only the Engine (with --offline-prompts)")
    args = parser.parse_args()
    base_args = ServerArgs.from_cli_args(args)
    cfg = resolve_model_config(base_args)
    slots = max(args.max_loras_per_batch, *args.num_adapters)
    max_rank = args.max_lora_rank or max(args.ranks)
    t = time.perf_counter()
    paths = {r: write_random_adapter(os.path.join(args.adapter_dir, f"{cfg.architecture}-r{r}"), cfg, r, seed=r)
             for r in args.ranks}
    print(f"adapters written/found in {time.perf_counter() - t:.1f} s: {paths}")

    if args.offline_prompts:
        rows = run_offline(base_args, paths[args.ranks[0]], args.ranks[0], args.num_adapters, args.offline_prompts,
                           args.input_len, args.output_len, args.repeat)
        print(f"\noffline: {args.offline_prompts} prompts, input {args.input_len}, output {args.output_len}; best of "
              f"{args.repeat}")
        print(f"{'configuration':<32} {'seconds':>8} {'output tok/s':>13} {'vs LoRA off':>12}")
        for label, seconds, tps in rows:
            print(f"{label:<32} {seconds:>8.2f} {tps:>13.1f} {(tps / rows[0][2] - 1) * 100:>+11.1f} %")
    if args.skip_steps:
        return
    results: dict[tuple[str, int], tuple[float, float]] = {}  # (config, batch) -> (prefill s, decode s/step)
    if not args.skip_base:
        # In a process of its own: a worker's KV pool takes the memory fraction, which a second one would lack.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            base = pool.submit(time_base, base_args, cfg, args.batch_size, args.input_len, args.output_len,
                               args.repeat).result()
        results.update({("base (LoRA off)", bs): r for bs, r in base.items()})

    lora_args = base_args.replace(enable_lora=True, lora_paths=None, max_loras_per_batch=slots,
                                  max_lora_rank=max_rank)
    worker = ModelWorker(ModelRunner(lora_args, cfg))
    loads = []
    for r, path in paths.items():
        load, first_use = cold_load(worker, f"cold-r{r}", path)
        loads.append((r, load, first_use))
        worker.unload_lora_adapter(f"cold-r{r}")
    for r, path in paths.items():
        names = [f"r{r}-{i}" for i in range(max(args.num_adapters))]
        for name in names:
            worker.load_lora_adapter(name, path)
        for n in args.num_adapters:
            if n == 0 and r != args.ranks[0]:
                continue  # base rows on the LoRA worker: once
            label = "base rows (LoRA on)" if n == 0 else f"rank {r}, {n} adapter{'s' * (n > 1)}"
            for bs in args.batch_size:
                rows = [names[i % n] if n else None for i in range(bs)]
                results[(label, bs)] = timed_batch(worker, rows, args.input_len, args.output_len, args.repeat)
        for name in names:
            worker.unload_lora_adapter(name)

    print(f"\nmodel {cfg.model_path} ({cfg.architecture}, {cfg.dtype}) on {worker.device}; pool {slots} slots at "
          f"max rank {max_rank}; input {args.input_len}, output {args.output_len}; best of {args.repeat}")
    print(f"{'configuration':<24} {'batch':>6} {'prefill ms':>11} {'decode ms/step':>15} {'decode tok/s':>13} "
          f"{'decode overhead':>16}")
    for (label, bs), (prefill, decode) in results.items():
        base = results.get(("base (LoRA off)", bs), results.get(("base rows (LoRA on)", bs)))
        overhead = f"{(decode / base[1] - 1) * 100:+.1f} %" if base is not None else "-"
        print(f"{label:<24} {bs:>6} {prefill * 1e3:>11.1f} {decode * 1e3:>15.2f} {bs / decode:>13.1f} {overhead:>16}")
    print(f"\n{'cold load':<24} {'rank':>6} {'read+check ms':>14} {'first-use extra ms':>19}")
    for r, load, first_use in loads:
        print(f"{'':<24} {r:>6} {load * 1e3:>14.1f} {first_use * 1e3:>19.2f}")


if __name__ == "__main__":
    main()
