"""Where a decode step's GPU time goes: one static batch decoded eagerly (no CUDA graph, so kernels are visible)
under torch.profiler; prints the kernels by total time per step, grouped, against the step's wall time with
CUDA graphs (what serving pays) and the bytes-roofline of the step.

    python bench/gpu/decode_kernels.py --model-path deepseek-v2-lite --load-format dummy --skip-tokenizer-init \
        --batch-size 1 64 --input-len 512
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from radixlm.config import ServerArgs
from radixlm.executor import ModelRunner, ModelWorker
from radixlm.executor.static_batch import decode_batch, extend_batch, release
from radixlm.models.loader import resolve_model_config

GROUPS = [("fused MoE GEMMs", ("moe_gemm",)), ("MoE alignment", ("align",)), ("MoE routing", ("grouped_topk",)),
          ("attention", ("decode", "extend", "_fwd_kernel")), ("GEMM (cuBLAS)", ("gemm", "gemv", "cutlass", "sm90")),
          ("norm / rotary / act", ("rms", "rotary", "silu", "norm")),
          ("copies / elementwise", ("copy", "elementwise", "cat", "index", "fill", "reduce", "scatter", "gather"))]


def profile_decode(worker: ModelWorker, bs: int, input_len: int, steps: int) -> tuple[profile, float]:
    """Prefill ``bs`` random prompts, then decode: a few steps to compile, ``steps`` timed, ``steps`` profiled."""
    memory = worker.memory
    g = torch.Generator().manual_seed(bs)
    prompts = torch.randint(0, worker.model_config.vocab_size, (bs, input_len), generator=g).tolist()
    rows = memory.req_to_token_pool.alloc(bs)
    seq_lens = [input_len] * bs
    try:
        worker.run(extend_batch(memory, rows, [0] * bs, prompts))

        def decode(n: int) -> None:
            nonlocal seq_lens
            for _ in range(n):
                worker.run(decode_batch(memory, rows, seq_lens, [1] * bs))
                seq_lens = [s + 1 for s in seq_lens]

        decode(3)
        torch.cuda.synchronize()
        start = time.perf_counter()
        decode(steps)
        torch.cuda.synchronize()
        step = (time.perf_counter() - start) / steps
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            decode(steps)
            torch.cuda.synchronize()
        return prof, step
    finally:
        release(worker, rows, seq_lens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ServerArgs.add_cli_args(parser)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1])
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    server_args = ServerArgs.from_cli_args(args).replace(disable_cuda_graph=True)
    worker = ModelWorker(ModelRunner(server_args, resolve_model_config(server_args)))
    for bs in args.batch_size:
        prof, step = profile_decode(worker, bs, args.input_len, args.steps)
        kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        for e in prof.key_averages():
            if e.device_type.name == "CUDA" and e.self_device_time_total > 0:
                kernels[e.key][0] += e.self_device_time_total / args.steps  # us per step
                kernels[e.key][1] += e.count / args.steps
        total = sum(us for us, _ in kernels.values())
        print(f"\nbatch {bs}, context {args.input_len}: eager step {step * 1e3:.2f} ms wall, GPU kernels "
              f"{total / 1e3:.2f} ms per step, {sum(n for _, n in kernels.values()):.0f} launches per step")
        grouped: dict[str, float] = defaultdict(float)
        for name, (us, _) in kernels.items():
            group = next((g for g, keys in GROUPS if any(k in name.lower() for k in keys)), "other")
            grouped[group] += us
        for group, us in sorted(grouped.items(), key=lambda kv: -kv[1]):
            print(f"  {group:24s} {us:9.1f} us  {us / total:6.1%}")
        print("  top kernels (us per step, launches per step):")
        for name, (us, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[: args.top]:
            print(f"    {us:9.1f}  {n:5.0f}  {name[:110]}")


if __name__ == "__main__":
    main()
