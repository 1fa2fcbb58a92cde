"""Latency of one static batch: prefill time for batch x input length, then decode ms/step.

Like SGLang's bench_one_batch: no scheduler, no server; random prompt ids, greedy decoding.

    python bench/one_batch.py --model-path llama-3.1-8b --load-format dummy --batch-size 1 8 32 \
        --input-len 1024 --output-len 32
"""

from __future__ import annotations

import argparse
import time

import torch

from radixlm.config import ServerArgs
from radixlm.executor import ModelRunner
from radixlm.executor.batch_builder import build_decode_batch, build_extend_batch
from radixlm.executor.static_batch import release
from radixlm.models.loader import resolve_model_config


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(runner: ModelRunner, batch_size: int, input_len: int, output_len: int) -> tuple[float, float]:
    """Returns (prefill seconds, mean decode seconds per step)."""
    g = torch.Generator().manual_seed(batch_size * 7919 + input_len)
    prompts = torch.randint(0, runner.model_config.vocab_size, (batch_size, input_len), generator=g).tolist()
    rows = runner.req_to_token_pool.alloc(batch_size)
    seq_lens = [input_len] * batch_size
    try:
        _sync(runner.device)
        start = time.perf_counter()
        fb = build_extend_batch(runner, rows, [0] * batch_size, prompts)
        next_ids = runner.sample(runner.forward(fb), fb)
        _sync(runner.device)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(output_len):
            fb = build_decode_batch(runner, rows, seq_lens, next_ids)
            seq_lens = fb.seq_lens_cpu
            next_ids = runner.sample(runner.forward(fb), fb)
        _sync(runner.device)
        return prefill, (time.perf_counter() - start) / max(output_len, 1)
    finally:
        release(runner, rows, seq_lens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ServerArgs.add_cli_args(parser)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1])
    parser.add_argument("--input-len", type=int, nargs="+", default=[1024])
    parser.add_argument("--output-len", type=int, default=16)
    args = parser.parse_args()
    server_args = ServerArgs.from_cli_args(args)
    t = time.perf_counter()
    runner = ModelRunner(server_args, resolve_model_config(server_args))
    print(f"model {runner.model_config.model_path} ({runner.model_config.architecture}, {runner.model_config.dtype}) "
          f"on {runner.device}: loaded in {time.perf_counter() - t:.1f} s; KV cache {runner.max_total_num_tokens} "
          f"tokens, {runner.max_running_requests} request slots")
    run_one(runner, 1, 16, 2)  # warm-up
    rows = []
    for bs in args.batch_size:
        for il in args.input_len:
            prefill, decode = run_one(runner, bs, il, args.output_len)
            rows.append((bs, il, prefill * 1e3, bs * il / prefill, decode * 1e3, bs / decode))
    print(f"{'batch':>6} {'input':>6} {'prefill ms':>11} {'prefill tok/s':>14} {'decode ms/step':>15} {'decode tok/s':>13}")
    for bs, il, pms, ptps, dms, dtps in rows:
        print(f"{bs:>6} {il:>6} {pms:>11.1f} {ptps:>14.0f} {dms:>15.2f} {dtps:>13.1f}")


if __name__ == "__main__":
    main()
