"""Where one scheduler step spends its time: runs a synthetic batch through the Scheduler in-process and prints
per-step wall times and a cProfile of one decode step.

    OMP_NUM_THREADS=1 python bench/profile_step.py --num-prompts 64 --input-len 32 --output-len 32
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import time

from radixlm.config import ServerArgs
from radixlm.core import Req
from radixlm.executor import ModelRunner, ModelWorker
from radixlm.models.loader import resolve_model_config
from radixlm.sampling import SamplingParams
from radixlm.scheduler import Scheduler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ServerArgs.add_cli_args(parser)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--top", type=int, default=12, help="profile rows to print")
    parser.add_argument("--sort", default="tottime", choices=["tottime", "cumtime"], help="profile order")
    args = parser.parse_args()
    server_args = ServerArgs.from_cli_args(args)
    scheduler = Scheduler(server_args, ModelWorker(ModelRunner(server_args, resolve_model_config(server_args))))
    rng = random.Random(1)
    vocab = scheduler.worker.model_config.vocab_size
    for i in range(args.num_prompts):
        params = SamplingParams(temperature=0.0, max_new_tokens=args.output_len, ignore_eos=True)
        params.normalize()
        ids = [rng.randrange(vocab) for _ in range(args.input_len)]
        scheduler.add_request(Req(rid=str(i), origin_input_ids=ids, sampling_params=params))
    profile, times = cProfile.Profile(), []
    while not scheduler.is_idle():
        profiled = len(times) == max(1, args.output_len // 2)  # a decode step in the middle
        start = time.perf_counter()
        if profiled:
            profile.enable()
        scheduler.step()
        if profiled:
            profile.disable()
        times.append(time.perf_counter() - start)
    decode = times[1:] if len(times) > 1 else times
    print(f"{len(times)} steps: first (prefill) {times[0]:.3f} s, decode mean {sum(decode) / len(decode):.3f} s")
    pstats.Stats(profile).sort_stats(args.sort).print_stats(args.top)


if __name__ == "__main__":
    main()
