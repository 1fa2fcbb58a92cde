"""Where a decode step's time goes on the GPU: wall time per step (batch building, graph replay, sampling, the
one host sync) against the GPU time of the replayed graph alone, and the GPU kernels of one eager step grouped
by kind.  The KV cache is filled by allocation only (values do not change the timing), so long contexts cost no
prefill.

    python bench/decode_profile.py --model-path llama-3.1-8b --load-format dummy --cases 1x256 128x2048
    python bench/decode_profile.py --model-path llama-3.1-8b --load-format dummy --quantization fp8 \
        --cases 1x256 --replay-kernels     # the kernels of one graph replay, in order, with their gaps
    python bench/decode_profile.py --model-path llama-3.1-8b --load-format dummy --cases 1x128 \
        --chained-timeline                 # chained steps: the replay's share and the GPU work outside it
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from radixlm.config import ServerArgs
from radixlm.executor import ModelRunner, ModelWorker
from radixlm.executor.static_batch import decode_batch, release
from radixlm.models.loader import resolve_model_config

KINDS = (("attention", ("_decode", "_extend", "attn")), ("gemm", ("gemm", "gemv", "xmma", "cutlass", "nvjet")),
         ("norm/rotary/act", ("rms", "rotary", "silu")))


def kind_of(name: str) -> str:
    lower = name.lower()
    return next((kind for kind, keys in KINDS if any(k in lower for k in keys)), "other")


def print_replay_kernels(replay: Callable[[], None], first: int = 30) -> None:
    """The kernels of one CUDA-graph replay as the GPU ran them: the first ``first`` in order with their
    durations and the gap after the one before (negative: they overlapped, as PDL lets them), then per kernel
    name the count, total and mean, and the replay's span against the sum of its kernels."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        replay()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    if not kernels:
        print("    (the profiler saw no kernels inside the replay)")
        return
    span = kernels[-1].time_range.end - kernels[0].time_range.start
    busy = sum(e.time_range.elapsed_us() for e in kernels)
    print(f"    replay: {len(kernels)} kernels, span {span:.1f} us, kernels {busy:.1f} us, gaps {span - busy:.1f} us")
    for prev, e in zip([None] + kernels, kernels[:first]):
        gap = e.time_range.start - prev.time_range.end if prev is not None else 0.0
        print(f"    {e.time_range.elapsed_us():8.2f} us  gap {gap:6.2f}  {e.name[:90]}")
    by_name: dict[str, list[float]] = defaultdict(list)
    for e in kernels:
        by_name[e.name].append(e.time_range.elapsed_us())
    for name, times in sorted(by_name.items(), key=lambda kv: -sum(kv[1])):
        print(f"    {sum(times):9.1f} us  {len(times):4d}x  mean {sum(times) / len(times):7.2f}  {name[:80]}")


def print_chained_timeline(worker: ModelWorker, bs: int, ctx: int, steps: int = 12) -> None:
    """Decode steps chained as the overlap schedule chains them (as ``bench/one_batch.py`` times them: each step's
    inputs are the last step's samples, still on the device; no host wait), profiled: the GPU time of a step,
    how much of it is the graph replay, and every GPU operation outside the replay (input uploads and copies,
    the KV slot bookkeeping, sampling, the copy to the host) with its mean duration and the idle time around
    it, per step.  The replay's kernels are found by their sequence (a standalone replay's kernel names)."""
    memory, graphs = worker.memory, worker.runner.cuda_graph_runner
    rows = memory.req_to_token_pool.alloc(bs)
    seq_lens = [ctx] * bs
    slots = memory.allocator.alloc(bs * ctx)
    for i, row in enumerate(rows):
        memory.req_to_token_pool.write(row, 0, slots[i * ctx : (i + 1) * ctx])
    previous = [0] * bs
    try:
        def chain(n: int) -> None:
            nonlocal seq_lens, previous
            pending = None
            for _ in range(n):
                pending = worker.sample(worker.launch(decode_batch(memory, rows, seq_lens, previous)))
                seq_lens = [s + 1 for s in seq_lens]
                previous = [-(i + 1) for i in range(bs)]
            pending.result()

        chain(4)
        fb = worker.launch(decode_batch(memory, rows, seq_lens, previous)).forward_batch
        worker.sample(worker.launch(decode_batch(memory, rows, [s + 1 for s in seq_lens], previous))).result()
        seq_lens = [s + 2 for s in seq_lens]
        graph = graphs.graphs[graphs.padded_size(fb)]  # the graph alone: its input copies are outside it
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            graph.replay()
            torch.cuda.synchronize()
        replay_names = [e.name for e in sorted((e for e in prof.events()
                                                if e.device_type == torch.autograd.DeviceType.CUDA),
                                               key=lambda e: e.time_range.start)]
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            chain(steps)
        ops = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
        names = [e.name for e in ops]
        k = len(replay_names)
        starts = [i for i in range(len(ops) - k + 1) if names[i : i + k] == replay_names]
        if len(starts) < 3:
            print(f"    chained: found {len(starts)} replays among {len(ops)} operations; no timeline")
            return
        # Steps between the first and the last replay found: step j is replay j's start to replay j+1's start.
        first, last = starts[0], starts[-1]
        span = ops[last].time_range.start - ops[first].time_range.start
        n = len(starts) - 1
        in_replay = set()
        replay_us = 0.0
        for s in starts[:-1]:
            in_replay.update(range(s, s + k))
            replay_us += ops[s + k - 1].time_range.end - ops[s].time_range.start
        outside: dict[str, list[float]] = defaultdict(list)
        busy = 0.0
        end_prev = ops[first].time_range.start
        for i in range(first, last):
            e = ops[i]
            busy += max(0.0, e.time_range.end - max(e.time_range.start, end_prev))
            end_prev = max(end_prev, e.time_range.end)
            if i not in in_replay:
                outside[e.name].append(e.time_range.elapsed_us())
        print(f"    chained x{steps}: GPU {span / n:.1f} us/step, of which the replay "
              f"(first to last kernel) {replay_us / n:.1f} us, outside it {span / n - replay_us / n:.1f} us "
              f"(GPU idle {(span - busy) / n:.1f} us/step); {len(ops)} operations")
        for name, times in sorted(outside.items(), key=lambda kv: -sum(kv[1])):
            print(f"    outside the replay: {sum(times) / n:7.2f} us/step  {len(times) / n:4.1f}x  "
                  f"mean {sum(times) / len(times):6.2f}  {name[:90]}")
    finally:
        release(worker, rows, seq_lens)


def run_case(worker: ModelWorker, bs: int, ctx: int, steps: int = 30, replay_kernels: bool = False) -> None:
    runner, memory = worker.runner, worker.memory
    rows = memory.req_to_token_pool.alloc(bs)
    slots = memory.allocator.alloc(bs * ctx)
    for i, row in enumerate(rows):
        memory.req_to_token_pool.write(row, 0, slots[i * ctx : (i + 1) * ctx])
    seq_lens, next_ids = [ctx] * bs, [0] * bs
    on_gpu = runner.device.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    try:
        def step() -> None:
            nonlocal seq_lens, next_ids
            next_ids = worker.run(decode_batch(memory, rows, seq_lens, next_ids)).next_token_ids  # one host sync
            seq_lens = [s + 1 for s in seq_lens]

        for _ in range(3):
            step()
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - start) / steps
        fb = worker.launch(decode_batch(memory, rows, seq_lens, next_ids)).forward_batch
        seq_lens = [s + 1 for s in seq_lens]
        gpu = float("nan")
        graphs = runner.cuda_graph_runner
        if graphs is not None and graphs.can_run(fb):
            graphs.replay(fb)
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(steps):
                graphs.replay(fb)
            end.record()
            torch.cuda.synchronize()
            gpu = begin.elapsed_time(end) / steps / 1e3
        if graphs is not None and graphs.can_run(fb) and replay_kernels:
            print_replay_kernels(lambda: graphs.replay(fb))
        with profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]) as prof:
            runner.forward_eager(fb)
            sync()
        own = (lambda e: e.self_device_time_total) if on_gpu else (lambda e: e.self_cpu_time_total)
        by_kind: dict[str, float] = defaultdict(float)
        for evt in prof.key_averages():
            by_kind[kind_of(evt.key)] += own(evt) / 1e6
        total = sum(by_kind.values())
        parts = ", ".join(f"{k} {v * 1e3:.2f} ms ({v / total:.0%})" for k, v in sorted(by_kind.items(),
                                                                                     key=lambda kv: -kv[1]))
        print(f"batch {bs:>4} context {ctx:>5}: wall {wall * 1e3:6.2f} ms/step, graph replay {gpu * 1e3:6.2f} ms "
              f"(host overhead {(wall - gpu) * 1e3:5.2f} ms); eager kernels {total * 1e3:.2f} ms: {parts}")
        top = sorted(prof.key_averages(), key=lambda e: -own(e))[:6]
        for evt in top:
            print(f"    {own(evt) / 1e3:8.3f} ms  {evt.count:4d}x  {evt.key[:100]}")
    finally:
        release(worker, rows, seq_lens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ServerArgs.add_cli_args(parser)
    parser.add_argument("--cases", nargs="+", default=["1x256", "128x2048"], help="BATCHxCONTEXT")
    parser.add_argument("--replay-kernels", action="store_true",
                        help="also list the kernels of one CUDA-graph replay, in order, with their gaps")
    parser.add_argument("--chained-timeline", action="store_true",
                        help="only profile chained decode steps: the replay's share of a step and the GPU work "
                             "outside it")
    args = parser.parse_args()
    server_args = ServerArgs.from_cli_args(args)
    worker = ModelWorker(ModelRunner(server_args, resolve_model_config(server_args)))
    for case in args.cases:
        bs, ctx = map(int, case.split("x"))
        if args.chained_timeline:
            print(f"batch {bs} context {ctx}:")
            print_chained_timeline(worker, bs, ctx)
            continue
        run_case(worker, bs, ctx, replay_kernels=args.replay_kernels)


if __name__ == "__main__":
    main()
