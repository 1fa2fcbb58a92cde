"""Cost of structured output: decode throughput of one batch with and without a JSON-schema constraint on every
request (same batch size, same number of tokens), and grammar compile time cold and cached.

    python bench/structured.py --batch-size 32 --output-len 64 [--device cuda --model-path ... --load-format ...]
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
from torch.profiler import ProfilerActivity, profile

from radixlm.config import ServerArgs
from radixlm.constrained import GrammarSpec
from radixlm.core import Req
from radixlm.executor import ModelRunner
from radixlm.models.loader import resolve_model_config
from radixlm.sampling import SamplingParams
from radixlm.scheduler import Scheduler

# Cannot complete within the run (at least 1000 items), so both runs decode every token.
LONG_SCHEMA = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 1000}
COMPILE_SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name"]},
    {"type": "object", "properties": {f"field_{i}": {"type": ["string", "number", "boolean", "null"]}
                                      for i in range(20)}, "required": [f"field_{i}" for i in range(10)]},
    {"$defs": {"node": {"type": "object", "properties": {"value": {"type": "integer"}, "children": {
        "type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 4}}, "required": ["value"]}},
     "$ref": "#/$defs/node"},
]


def decode_rate(scheduler: Scheduler, batch: int, input_len: int, output_len: int, schema: str | None,
                profile_steps: int = 0, trace: str | None = None) -> tuple[float, list[Req]]:
    """Output tokens per second of the decode steps (the prefill step is left out).  With ``profile_steps`` (CUDA),
    also prints where the host spends those decode steps (torch profiler, after 5 steps of warm-up)."""
    rng = random.Random(0)
    vocab = scheduler.runner.model_config.vocab_size
    reqs = []
    for i in range(batch):
        params = SamplingParams(temperature=0.0, max_new_tokens=output_len, ignore_eos=True, json_schema=schema)
        params.normalize()
        req = Req(rid=f"{schema is not None}-{i}", origin_input_ids=[rng.randrange(vocab) for _ in range(input_len)],
                  sampling_params=params)
        scheduler.add_request(req)
        reqs.append(req)
    while scheduler.grammar_queue or not scheduler.running:  # compile, then the prefill step
        scheduler.step()
    start, tokens = time.perf_counter(), sum(len(r.output_ids) for r in reqs)
    if profile_steps:
        for _ in range(5):
            scheduler.step()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(profile_steps):
                scheduler.step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
        if trace:
            prof.export_chrome_trace(trace)
    while not scheduler.is_idle():
        scheduler.step()
    elapsed = time.perf_counter() - start
    assert all(r.finished_reason["type"] == "length" for r in reqs), [r.finished_reason for r in reqs]
    return (sum(len(r.output_ids) for r in reqs) - tokens) / elapsed, reqs


def fill_cost(compiled, outputs: list[list[int]], vocab_size: int) -> float:
    """Host ms per decode step to fill the masks of the batch one matcher after another, as the scheduler does,
    replaying the constrained run's own tokens."""
    import xgrammar as xgr

    matchers = [xgr.GrammarMatcher(compiled) for _ in outputs]
    bitmask = xgr.allocate_token_bitmask(len(outputs), vocab_size)
    steps = min(map(len, outputs))
    start = time.perf_counter()
    for t in range(steps):
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)
        for m, out in zip(matchers, outputs):
            m.accept_token(out[t])
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ServerArgs.add_cli_args(parser)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="also profile this many constrained decode steps (CUDA) and print the top host ops")
    parser.add_argument("--trace", help="with --profile: write the profile as a Chrome trace here")
    args = parser.parse_args()
    server_args = ServerArgs.from_cli_args(args)
    scheduler = Scheduler(server_args, ModelRunner(server_args, resolve_model_config(server_args)))
    backend = scheduler.grammar_backend
    assert backend is not None, "needs --grammar-backend xgrammar and a tokenizer"

    backend.compile(GrammarSpec("regex", "a")).result()  # load the tokenizer and its vocabulary tables once
    rows = []
    for spec in (GrammarSpec("json_schema", json.dumps(s)) for s in COMPILE_SCHEMAS):
        start = time.perf_counter()
        backend.compile(spec).result()
        cold = time.perf_counter() - start
        start = time.perf_counter()
        backend.compile(spec).result()
        rows.append((len(spec.text), cold, time.perf_counter() - start))
    print(f"{'schema chars':>12} {'cold compile ms':>16} {'cached ms':>10}")
    for chars, cold, cached in rows:
        print(f"{chars:>12} {cold * 1e3:>16.2f} {cached * 1e3:>10.3f}")

    decode_rate(scheduler, 2, 8, 4, None)  # warm-up
    free, _ = decode_rate(scheduler, args.batch_size, args.input_len, args.output_len, None)
    constrained, reqs = decode_rate(scheduler, args.batch_size, args.input_len, args.output_len,
                                    json.dumps(LONG_SCHEMA))
    free_again, _ = decode_rate(scheduler, args.batch_size, args.input_len, args.output_len, None)
    if args.profile:
        decode_rate(scheduler, args.batch_size, args.input_len, args.output_len, json.dumps(LONG_SCHEMA),
                    args.profile, args.trace)
    print(f"\nbatch {args.batch_size}, {args.output_len} tokens each, device {server_args.device}")
    print(f"{'run':<28} {'decode tok/s':>12}")
    for name, rate in (("unconstrained", free), ("JSON schema on every request", constrained),
                       ("unconstrained again", free_again)):
        print(f"{name:<28} {rate:>12.1f}")
    base = (free + free_again) / 2
    print(f"throughput loss with constraints: {(1 - constrained / base) * 100:.1f}%")
    fill = fill_cost(backend.compile(GrammarSpec("json_schema", json.dumps(LONG_SCHEMA))).result(),
                     [r.output_ids for r in reqs], scheduler.runner.model_config.vocab_size)
    print(f"mask filling and token acceptance per step (host, this run's tokens): {fill:.3f} ms")
    backend.shutdown()


if __name__ == "__main__":
    main()
