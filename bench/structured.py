"""Cost of structured output: decode throughput of one batch with and without a JSON-schema constraint on every
request (same batch size, same number of tokens), and grammar compile time cold and cached.

    python bench/structured.py --batch-size 32 --output-len 64 [--device cuda --model-path ... --load-format ...]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from overlap import add_batch, decode_rate, start_decoding
from torch.profiler import ProfilerActivity, profile

from radixlm.config import ServerArgs
from radixlm.constrained import GrammarSpec
from radixlm.core import Req
from radixlm.executor import ModelRunner, ModelWorker
from radixlm.models.loader import resolve_model_config
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


def constrained_rate(scheduler: Scheduler, args: argparse.Namespace, schema: str | None) -> tuple[float, list[Req]]:
    """Decode tok/s of one batch, every request with ``schema`` (or none); every request decodes all its tokens."""
    reqs = add_batch(scheduler, args.batch_size, args.input_len, args.output_len, "c", json_schema=schema)
    rate = decode_rate(scheduler, reqs)
    assert all(r.finished_reason["type"] == "length" for r in reqs), [r.finished_reason for r in reqs]
    return rate, reqs


def print_host_profile(scheduler: Scheduler, args: argparse.Namespace, trace: str | None) -> None:
    """Where the host spends ``args.profile`` constrained decode steps (torch profiler, after 5 steps of warm-up);
    optionally written as a Chrome trace."""
    add_batch(scheduler, args.batch_size, args.input_len, args.output_len, "p", json_schema=json.dumps(LONG_SCHEMA))
    start_decoding(scheduler)
    for _ in range(5):
        scheduler.step()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.profile):
            scheduler.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
    if trace:
        prof.export_chrome_trace(trace)
    while not scheduler.is_idle():
        scheduler.step()


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
    scheduler = Scheduler(server_args, ModelWorker(ModelRunner(server_args, resolve_model_config(server_args))))
    backend = scheduler.grammars.backend
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

    decode_rate(scheduler, add_batch(scheduler, 2, 8, 4, "w"))  # warm-up
    free, _ = constrained_rate(scheduler, args, None)
    constrained, reqs = constrained_rate(scheduler, args, json.dumps(LONG_SCHEMA))
    free_again, _ = constrained_rate(scheduler, args, None)
    if args.profile:
        print_host_profile(scheduler, args, args.trace)
    print(f"\nbatch {args.batch_size}, {args.output_len} tokens each, device {server_args.device}")
    print(f"{'run':<28} {'decode tok/s':>12}")
    for name, rate in (("unconstrained", free), ("JSON schema on every request", constrained),
                       ("unconstrained again", free_again)):
        print(f"{name:<28} {rate:>12.1f}")
    base = (free + free_again) / 2
    print(f"throughput loss with constraints: {(1 - constrained / base) * 100:.1f}%")
    fill = fill_cost(backend.compile(GrammarSpec("json_schema", json.dumps(LONG_SCHEMA))).result(),
                     [r.output_ids for r in reqs], scheduler.worker.model_config.vocab_size)
    print(f"mask filling and token acceptance per step (host, this run's tokens): {fill:.3f} ms")


if __name__ == "__main__":
    main()
