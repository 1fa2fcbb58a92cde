"""Run a fixed batch of requests to the end: one EXTEND of every prompt, then DECODE steps of the whole batch.

No scheduling, no admission control: this is the engine at its simplest, used by the parity tests, the
tensor-parallel test, the runner's warm-up and ``bench/one_batch.py``.  It speaks the same contract as the
scheduler: it assigns rows and KV slots, describes each step as a ``Batch`` and runs it on a ``ModelWorker``.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from radixlm.core import Batch, ForwardMode, SamplingRows, new_epoch
from radixlm.mem import KVMemory, assign_kv_slots
from radixlm.sampling import SamplingParams

if TYPE_CHECKING:
    from radixlm.executor.worker import ModelWorker


class OutOfKVMemory(RuntimeError):
    """The KV pool has too few free slots for the batch (nothing was allocated)."""


def generate_static(
    worker: "ModelWorker",
    prompts: list[list[int]],
    sampling_params: SamplingParams | list[SamplingParams] | None = None,
    stop_at_eos: bool = True,
    lora_names: list[str | None] | None = None,
) -> list[list[int]]:
    """Generate for every prompt; returns the output token ids (ending with EOS when one was produced).
    ``lora_names``: per prompt, the LoRA adapter it runs under (None: the base model).

    Each request runs until EOS (unless ``ignore_eos`` or not ``stop_at_eos``) or its ``max_new_tokens``;
    requests that finish early stay in the batch and their extra tokens are dropped.
    """
    n = len(prompts)
    cfg = worker.model_config
    if sampling_params is None:
        sampling_params = SamplingParams(temperature=0.0)
    params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * n
    params = [_normalized(p, cfg.vocab_size) for p in params]
    rng = random.Random(worker.runner.server_args.random_seed)
    seeds = [p.seed if p.seed is not None else rng.getrandbits(63) for p in params]
    eos = set(cfg.eos_token_ids)
    memory = worker.memory
    rows = memory.req_to_token_pool.alloc(n)
    if rows is None:
        raise RuntimeError(f"{n} requests exceed the {memory.req_to_token_pool.size} request slots")
    seq_lens = [len(p) for p in prompts]
    outputs: list[list[int]] = [[] for _ in prompts]
    # One epoch: the rows never change, so the worker keeps their sampling state from step to step.
    sampling = SamplingRows(params, seeds, prompts, [[] for _ in prompts], new_epoch())
    context = cfg.context_length
    limits = [min(p.max_new_tokens if p.max_new_tokens is not None else context, context - len(ids))
              for p, ids in zip(params, prompts)]
    done = [limit <= 0 for limit in limits]
    try:
        batch = extend_batch(memory, rows, [0] * n, prompts, sampling)
        batch.lora_names = lora_names
    except OutOfKVMemory:
        memory.req_to_token_pool.free(rows)
        raise
    try:
        while True:
            tokens = worker.run(batch).next_token_ids
            for i, tok in enumerate(tokens):
                if done[i]:
                    continue
                outputs[i].append(tok)
                hit_eos = stop_at_eos and not params[i].ignore_eos and tok in eos
                if hit_eos or len(outputs[i]) >= limits[i]:
                    done[i] = True
            if all(done):
                return outputs
            batch = decode_batch(memory, rows, seq_lens, tokens, sampling)
            batch.lora_names = lora_names
            seq_lens = [s + 1 for s in seq_lens]
    finally:
        release(worker, rows, seq_lens)


def extend_batch(memory: KVMemory, rows: list[int], prefix_lens: list[int], new_ids: list[list[int]],
                 sampling: SamplingRows | None = None) -> Batch:
    """EXTEND: request row ``rows[i]`` adds ``new_ids[i]`` after ``prefix_lens[i]`` tokens already in its KV;
    its KV slots are assigned here (``OutOfKVMemory``, allocating nothing, when the pool is short)."""
    seq_lens = [p + len(ids) for p, ids in zip(prefix_lens, new_ids)]
    slots = assign_kv_slots(memory.req_to_token_pool, memory.allocator, rows, prefix_lens, seq_lens)
    if slots is None:
        raise OutOfKVMemory(f"{sum(seq_lens) - sum(prefix_lens)} new tokens do not fit the KV pool "
                            f"({memory.allocator.available_size()} slots free)")
    return Batch(ForwardMode.EXTEND, list(rows), list(prefix_lens), [len(ids) for ids in new_ids],
                 [t for ids in new_ids for t in ids], slots, sampling)


def decode_batch(memory: KVMemory, rows: list[int], seq_lens: list[int], token_ids: list[int],
                 sampling: SamplingRows | None = None) -> Batch:
    """DECODE: request row ``rows[i]`` appends ``token_ids[i]`` at position ``seq_lens[i]``."""
    slots = assign_kv_slots(memory.req_to_token_pool, memory.allocator, rows, seq_lens, [s + 1 for s in seq_lens])
    if slots is None:
        raise OutOfKVMemory(f"no KV slots left for a decode step of {len(rows)} requests")
    return Batch(ForwardMode.DECODE, list(rows), list(seq_lens), [1] * len(rows), list(token_ids), slots, sampling)


def release(worker: "ModelWorker", rows: list[int], seq_lens: list[int]) -> None:
    """Return the KV slots of requests ``rows`` (holding ``seq_lens`` tokens) and their request slots."""
    memory = worker.memory
    table = memory.req_to_token_pool.req_to_token
    memory.allocator.free_group_begin()
    for row, n in zip(rows, seq_lens):
        memory.allocator.free(table[row, :n].long())
    memory.allocator.free_group_end()
    memory.req_to_token_pool.free(rows)


def _normalized(p: SamplingParams, vocab_size: int) -> SamplingParams:
    p = SamplingParams(**vars(p))
    p.normalize()
    p.verify(vocab_size)
    return p
