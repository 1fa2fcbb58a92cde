"""The overlap schedule, measured: decode throughput at several batch sizes and, on CUDA, the GPU busy
fraction over consecutive decode steps (kernel time / wall span, from the torch profiler).  Run it twice, with
and without ``--disable-overlap-schedule`` (one model per process: the KV pool takes the GPU's memory).

    python bench/overlap.py --model-path llama-3.2-1b --load-format dummy --batch-size 1 32 64 128
    python bench/overlap.py --model-path llama-3.2-1b --load-format dummy --batch-size 1 32 64 128 \
        --disable-overlap-schedule
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from torch.profiler import ProfilerActivity, profile

from radixlm.config import ServerArgs
from radixlm.core import Req
from radixlm.executor import ModelRunner
from radixlm.models.loader import resolve_model_config
from radixlm.sampling import SamplingParams
from radixlm.scheduler import Scheduler


def add_batch(scheduler: Scheduler, batch: int, input_len: int, output_len: int, tag: str) -> list[Req]:
    rng = random.Random(batch)
    vocab = scheduler.runner.model_config.vocab_size
    reqs = []
    for i in range(batch):
        params = SamplingParams(temperature=0.0, max_new_tokens=output_len, ignore_eos=True)
        params.normalize()
        reqs.append(Req(rid=f"{tag}{i}", origin_input_ids=[rng.randrange(vocab) for _ in range(input_len)],
                        sampling_params=params))
        scheduler.add_request(reqs[-1])
    return reqs


def decode_rate(scheduler: Scheduler, batch: int, input_len: int, output_len: int) -> float:
    reqs = add_batch(scheduler, batch, input_len, output_len, "r")
    while not scheduler.running:  # the prefill
        scheduler.step()
    done_before = sum(len(r.output_ids) for r in reqs)
    start = time.perf_counter()
    while not scheduler.is_idle():
        scheduler.step()
    return (sum(len(r.output_ids) for r in reqs) - done_before) / (time.perf_counter() - start)


def busy_fraction(scheduler: Scheduler, batch: int, input_len: int, steps: int = 30) -> float:
    """Kernel time over the wall span of ``steps`` consecutive decode steps (CUDA only)."""
    add_batch(scheduler, batch, input_len, steps + 20, "b")
    while not scheduler.running:
        scheduler.step()
    for _ in range(5):
        scheduler.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            scheduler.step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time for e in kernels)
    span = max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)
    while not scheduler.is_idle():
        scheduler.step()
    return busy / span


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ServerArgs.add_cli_args(parser)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    args = parser.parse_args()
    server_args = ServerArgs.from_cli_args(args)
    scheduler = Scheduler(server_args, ModelRunner(server_args, resolve_model_config(server_args)))
    decode_rate(scheduler, 2, 8, 4)  # warm-up
    mode = "off" if server_args.disable_overlap_schedule else "on"
    print(f"{'overlap':>8} {'batch':>6} {'decode tok/s':>13} {'GPU busy':>9}")
    for bs in args.batch_size:
        rate = decode_rate(scheduler, bs, args.input_len, args.output_len)
        busy = busy_fraction(scheduler, bs, args.input_len) if server_args.device == "cuda" else float("nan")
        print(f"{mode:>8} {bs:>6} {rate:>13.1f} {busy:>9.1%}")


if __name__ == "__main__":
    main()
