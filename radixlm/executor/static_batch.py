"""Run a fixed batch of requests to the end: one EXTEND of every prompt, then DECODE steps of the whole batch.

No scheduling, no admission control: this is the engine at its simplest, used by the parity tests, the
tensor-parallel test and ``bench/one_batch.py``.  The continuous-batching scheduler builds on the same
``build_extend_batch`` / ``build_decode_batch``.
"""

from __future__ import annotations

import random

import torch

from radixlm.executor.batch_builder import build_decode_batch, build_extend_batch
from radixlm.executor.model_runner import ModelRunner
from radixlm.sampling import SamplingBatchInfo, SamplingParams


def generate_static(
    runner: ModelRunner,
    prompts: list[list[int]],
    sampling_params: SamplingParams | list[SamplingParams] | None = None,
    stop_at_eos: bool = True,
) -> list[list[int]]:
    """Generate for every prompt; returns the output token ids (ending with EOS when one was produced).

    Each request runs until EOS (unless ``ignore_eos`` or not ``stop_at_eos``) or its ``max_new_tokens``;
    requests that finish early stay in the batch and their extra tokens are dropped.
    """
    n = len(prompts)
    if sampling_params is None:
        sampling_params = SamplingParams(temperature=0.0)
    params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * n
    params = [_normalized(p, runner.model_config.vocab_size) for p in params]
    rng = random.Random(runner.server_args.random_seed)
    seeds = [p.seed if p.seed is not None else rng.getrandbits(63) for p in params]
    eos = set(runner.model_config.eos_token_ids)
    info = SamplingBatchInfo.from_requests(params, seeds, prompts, [[] for _ in prompts], eos,
                                           runner.model_config.vocab_size, runner.device)
    rows = runner.req_to_token_pool.alloc(n)
    if rows is None:
        raise RuntimeError(f"{n} requests exceed the {runner.req_to_token_pool.size} request slots")
    seq_lens = [len(p) for p in prompts]
    outputs: list[list[int]] = [[] for _ in prompts]
    context = runner.model_config.context_length
    limits = [min(p.max_new_tokens if p.max_new_tokens is not None else context, context - len(ids))
              for p, ids in zip(params, prompts)]
    done = [limit <= 0 for limit in limits]
    try:
        fb = build_extend_batch(runner, rows, [0] * n, prompts, sampling_info=info)
    except Exception:
        runner.req_to_token_pool.free(rows)  # no KV slot was allocated
        raise
    try:
        next_ids = runner.sample(runner.forward(fb), fb)
        while True:
            info.update(next_ids)
            for i, tok in enumerate(next_ids.tolist()):
                if done[i]:
                    continue
                outputs[i].append(tok)
                hit_eos = stop_at_eos and not params[i].ignore_eos and tok in eos
                if hit_eos or len(outputs[i]) >= limits[i]:
                    done[i] = True
            if all(done):
                return outputs
            fb = build_decode_batch(runner, rows, seq_lens, next_ids, sampling_info=info)
            seq_lens = fb.seq_lens_cpu
            next_ids = runner.sample(runner.forward(fb), fb)
    finally:
        release(runner, rows, seq_lens)


def release(runner: ModelRunner, rows: list[int], seq_lens: list[int]) -> None:
    """Return the KV slots of requests ``rows`` (holding ``seq_lens`` tokens) and their request slots."""
    table = runner.req_to_token_pool.req_to_token
    slots = [table[r, :s] for r, s in zip(rows, seq_lens)]
    if slots:
        runner.token_to_kv_pool_allocator.free(torch.cat(slots).long())
    runner.req_to_token_pool.free(rows)


def _normalized(p: SamplingParams, vocab_size: int) -> SamplingParams:
    p = SamplingParams(**vars(p))
    p.normalize()
    p.verify(vocab_size)
    return p
