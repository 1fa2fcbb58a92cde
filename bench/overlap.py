"""Steady decode, measured: decode throughput at several batch sizes and, on CUDA, the GPU busy fraction over
consecutive decode steps (kernel time / wall span, from the torch profiler; "stalls" counts only gaps of
20 us or more between kernels, the GPU waiting for the host) and, with ``--tp-size`` > 1, the
time in NCCL collectives per step (two all-reduces per layer, plus the vocabulary-parallel embedding's
all-reduce and the logits' all-gather).  Run it with and without ``--disable-overlap-schedule`` (one model per
process: the KV pool takes the GPU's memory), and at several TP sizes (one process per rank, in lockstep).

    python bench/overlap.py --model-path llama-3.2-1b --load-format dummy --batch-size 1 32 64 128
    python bench/overlap.py --model-path llama-3.2-1b --load-format dummy --batch-size 1 32 64 128 \
        --disable-overlap-schedule
    python bench/overlap.py --model-path llama-3.1-8b --load-format dummy --batch-size 1 32 128 --tp-size 2
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass

import torch
import torch.multiprocessing as mp
from torch.profiler import ProfilerActivity, profile

from radixlm.config import ServerArgs
from radixlm.core import Req
from radixlm.distributed import destroy_tensor_parallel, free_local_addr, set_multi_gpu_env
from radixlm.executor import ModelRunner, ModelWorker
from radixlm.models.loader import resolve_model_config
from radixlm.sampling import SamplingParams
from radixlm.scheduler import Scheduler


def add_batch(scheduler: Scheduler, batch: int, input_len: int, output_len: int, tag: str,
              json_schema: str | None = None) -> list[Req]:
    """``batch`` greedy requests of random ids that decode exactly ``output_len`` tokens."""
    rng = random.Random(batch)
    vocab = scheduler.worker.model_config.vocab_size
    reqs = []
    for i in range(batch):
        params = SamplingParams(temperature=0.0, max_new_tokens=output_len, ignore_eos=True, json_schema=json_schema)
        params.normalize()
        reqs.append(Req(rid=f"{tag}{i}", origin_input_ids=[rng.randrange(vocab) for _ in range(input_len)],
                        sampling_params=params))
        scheduler.add_request(reqs[-1])
    return reqs


def start_decoding(scheduler: Scheduler) -> None:
    """Step until the requests just added decode: grammar compilation, then the prefill."""
    while scheduler.grammars or not scheduler.running:
        scheduler.step()


def decode_rate(scheduler: Scheduler, reqs: list[Req]) -> float:
    """Output tokens per second of the decode steps of the requests just added (compilation and prefill left
    out), run to completion."""
    start_decoding(scheduler)
    done_before = sum(len(r.output_ids) for r in reqs)
    start = time.perf_counter()
    while not scheduler.is_idle():
        scheduler.step()
    return (sum(len(r.output_ids) for r in reqs) - done_before) / (time.perf_counter() - start)


STALL_US = 20  # a gap this long between kernels is a wait for the host, not the launch latency inside a graph


@dataclass
class StepProfile:
    busy: float  # kernel time / wall span of the profiled steps
    stall: float  # idle gaps of >= STALL_US between kernels / wall span: the GPU waiting for the host
    step_ms: float  # wall span per step
    comm_ms: float  # NCCL kernel time per step
    collectives: float  # NCCL kernels per step


def profile_steps(scheduler: Scheduler, batch: int, input_len: int, steps: int = 30) -> StepProfile:
    """Profile ``steps`` consecutive decode steps of one batch (CUDA only)."""
    add_batch(scheduler, batch, input_len, steps + 20, "b")
    start_decoding(scheduler)
    for _ in range(5):
        scheduler.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            scheduler.step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    comm = [e for e in kernels if "nccl" in e.name.lower()]
    busy = sum(e.device_time for e in kernels)
    span = max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)
    intervals = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    stall, covered = 0.0, intervals[0][1]
    for start, end in intervals[1:]:
        if start - covered >= STALL_US:
            stall += start - covered
        covered = max(covered, end)
    while not scheduler.is_idle():
        scheduler.step()
    return StepProfile(busy / span, stall / span, span / steps / 1e3,
                       sum(e.device_time for e in comm) / steps / 1e3, len(comm) / steps)


def run_rank(rank: int, server_args: ServerArgs, batch_sizes: list[int], input_len: int, output_len: int) -> None:
    """One TP rank; every rank runs the same steps in lockstep, rank 0 prints."""
    runner = ModelRunner(server_args, resolve_model_config(server_args), tp_rank=rank)
    scheduler = Scheduler(server_args, ModelWorker(runner))
    decode_rate(scheduler, add_batch(scheduler, 2, 8, 4, "w"))  # warm-up
    mode = "off" if server_args.disable_overlap_schedule else "on"
    if rank == 0:
        print(f"{'overlap':>8} {'tp':>3} {'batch':>6} {'decode tok/s':>13} {'step ms':>8} {'GPU busy':>9} "
              f"{'stalls':>7} {'NCCL ms/step':>13} {'NCCL us each':>13}")
    for bs in batch_sizes:
        rate = decode_rate(scheduler, add_batch(scheduler, bs, input_len, output_len, "r"))
        if server_args.device != "cuda":
            if rank == 0:
                print(f"{mode:>8} {server_args.tp_size:>3} {bs:>6} {rate:>13.1f}")
            continue
        p = profile_steps(scheduler, bs, input_len)
        each = p.comm_ms * 1e3 / p.collectives if p.collectives else 0.0
        if rank == 0:
            print(f"{mode:>8} {server_args.tp_size:>3} {bs:>6} {rate:>13.1f} {p.step_ms:>8.2f} {p.busy:>9.1%} "
                  f"{p.stall:>7.1%} {p.comm_ms:>13.3f} {each:>13.1f}")
    destroy_tensor_parallel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ServerArgs.add_cli_args(parser)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    args = parser.parse_args()
    server_args = ServerArgs.from_cli_args(args)
    run_args = (server_args, args.batch_size, args.input_len, args.output_len)
    if server_args.tp_size == 1:
        run_rank(0, *run_args)
        return
    set_multi_gpu_env()
    if server_args.dist_init_addr is None:
        server_args = server_args.replace(dist_init_addr=free_local_addr())
    mp.spawn(run_rank, args=(server_args, *run_args[1:]), nprocs=server_args.tp_size)


if __name__ == "__main__":
    main()
