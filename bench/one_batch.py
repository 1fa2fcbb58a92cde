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
from radixlm.executor import ModelRunner, ModelWorker
from radixlm.executor.static_batch import decode_batch, extend_batch, release
from radixlm.models.loader import resolve_model_config


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(worker: ModelWorker, batch_size: int, input_len: int, output_len: int) -> tuple[float, float]:
    """Returns (prefill seconds, mean decode seconds per step).  Decode steps are chained as the overlap schedule
    chains them: each step's input ids are the previous step's samples, still on the device, so the host never
    waits inside the loop."""
    g = torch.Generator().manual_seed(batch_size * 7919 + input_len)
    prompts = torch.randint(0, worker.model_config.vocab_size, (batch_size, input_len), generator=g).tolist()
    memory = worker.memory
    rows = memory.req_to_token_pool.alloc(batch_size)
    seq_lens = [input_len] * batch_size
    previous = [-(i + 1) for i in range(batch_size)]  # placeholders: the last step's sample of each row
    try:
        _sync(worker.device)
        start = time.perf_counter()
        worker.run(extend_batch(memory, rows, [0] * batch_size, prompts))
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(output_len):
            pending = worker.sample(worker.launch(decode_batch(memory, rows, seq_lens, previous)))
            seq_lens = [s + 1 for s in seq_lens]
        pending.result()
        return prefill, (time.perf_counter() - start) / max(output_len, 1)
    finally:
        release(worker, rows, seq_lens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ServerArgs.add_cli_args(parser)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1])
    parser.add_argument("--input-len", type=int, nargs="+", default=[1024])
    parser.add_argument("--output-len", type=int, default=16)
    args = parser.parse_args()
    server_args = ServerArgs.from_cli_args(args)
    t = time.perf_counter()
    worker = ModelWorker(ModelRunner(server_args, resolve_model_config(server_args)))
    cfg, memory = worker.model_config, worker.memory
    print(f"model {cfg.model_path} ({cfg.architecture}, {cfg.dtype}) on {worker.device}: loaded in "
          f"{time.perf_counter() - t:.1f} s; KV cache {memory.max_total_num_tokens} tokens, "
          f"{memory.max_running_requests} request slots")
    run_one(worker, 1, 16, 2)  # warm-up
    rows = []
    for bs in args.batch_size:
        for il in args.input_len:
            run_one(worker, bs, il, 2)  # this shape's kernels compiled (Triton specialises on sizes) before timing
            prefill, decode = run_one(worker, bs, il, args.output_len)
            rows.append((bs, il, prefill * 1e3, bs * il / prefill, decode * 1e3, bs / decode))
    print(f"{'batch':>6} {'input':>6} {'prefill ms':>11} {'prefill tok/s':>14} {'decode ms/step':>15} {'decode tok/s':>13}")
    for bs, il, pms, ptps, dms, dtps in rows:
        print(f"{bs:>6} {il:>6} {pms:>11.1f} {ptps:>14.0f} {dms:>15.2f} {dtps:>13.1f}")


if __name__ == "__main__":
    main()
