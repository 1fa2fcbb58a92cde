"""Build ``ForwardBatch``es: allocate KV slots for the new tokens, record them in ``req_to_token``, and move
the batch description to the device in a few tensor copies."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from radixlm.core import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    from radixlm.executor.model_runner import ModelRunner
    from radixlm.sampling import SamplingBatchInfo


class OutOfKVMemory(RuntimeError):
    """The KV pool has too few free slots for the new tokens (nothing was allocated)."""


def build_extend_batch(
    runner: "ModelRunner",
    req_pool_indices: list[int],
    prefix_lens: list[int],
    new_token_ids: list[list[int]],
    logits_start: list[int] | None = None,
    sampling_info: "SamplingBatchInfo | None" = None,
) -> ForwardBatch:
    """EXTEND batch: request i adds ``new_token_ids[i]`` after ``prefix_lens[i]`` tokens already in its KV row.

    ``logits_start[i]``: return logits of request i's new tokens from that index on (prompt logprobs).
    """
    extend_lens = [len(t) for t in new_token_ids]
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    out_cache_loc = _alloc(runner, req_pool_indices, prefix_lens, seq_lens)
    table = runner.req_to_token_pool
    offset = 0
    for row, prefix, ext in zip(req_pool_indices, prefix_lens, extend_lens):
        table.write(row, prefix, out_cache_loc[offset : offset + ext])
        offset += ext
    device = runner.device
    starts = [0]
    for e in extend_lens[:-1]:
        starts.append(starts[-1] + e)
    positions = torch.cat([torch.arange(p, s) for p, s in zip(prefix_lens, seq_lens)])
    return ForwardBatch(
        forward_mode=ForwardMode.EXTEND,
        batch_size=len(req_pool_indices),
        input_ids=to_device_async([t for ids in new_token_ids for t in ids], device),
        positions=positions.to(device),
        req_pool_indices=to_device_async(req_pool_indices, device),
        seq_lens=to_device_async(seq_lens, device),
        seq_lens_cpu=seq_lens,
        out_cache_loc=out_cache_loc,
        req_to_token_pool=runner.req_to_token_pool,
        token_to_kv_pool=runner.token_to_kv_pool,
        attn_backend=runner.attn_backend,
        extend_prefix_lens=to_device_async(prefix_lens, device),
        extend_seq_lens=to_device_async(extend_lens, device),
        extend_start_loc=to_device_async(starts, device),
        extend_prefix_lens_cpu=list(prefix_lens),
        extend_seq_lens_cpu=extend_lens,
        extend_logits_start_cpu=logits_start,
        sampling_info=sampling_info,
    )


def build_decode_batch(
    runner: "ModelRunner",
    req_pool_indices: list[int],
    seq_lens_before: list[int],
    last_token_ids: list[int] | torch.Tensor,
    sampling_info: "SamplingBatchInfo | None" = None,
) -> ForwardBatch:
    """DECODE batch: each request appends one token (its last sampled one) at position ``seq_lens_before[i]``."""
    seq_lens = [s + 1 for s in seq_lens_before]
    out_cache_loc = _alloc(runner, req_pool_indices, seq_lens_before, seq_lens)
    rows = to_device_async(req_pool_indices, runner.device)
    positions = to_device_async(seq_lens_before, runner.device)
    runner.req_to_token_pool.req_to_token[rows, positions] = out_cache_loc.to(torch.int32)
    if not isinstance(last_token_ids, torch.Tensor):
        last_token_ids = to_device_async(last_token_ids, runner.device)
    return ForwardBatch(
        forward_mode=ForwardMode.DECODE,
        batch_size=len(req_pool_indices),
        input_ids=last_token_ids.to(runner.device, torch.int64),
        positions=positions,
        req_pool_indices=rows,
        seq_lens=positions + 1,
        seq_lens_cpu=seq_lens,
        out_cache_loc=out_cache_loc,
        req_to_token_pool=runner.req_to_token_pool,
        token_to_kv_pool=runner.token_to_kv_pool,
        attn_backend=runner.attn_backend,
        sampling_info=sampling_info,
    )


def to_device_async(values: list[int], device: torch.device) -> torch.Tensor:
    """int64 host list -> device tensor without waiting for the GPU: from pinned memory, asynchronously (a copy
    from pageable memory would synchronise with the work in flight and undo the overlap schedule)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.int64)
    return torch.tensor(values, dtype=torch.int64, pin_memory=True).to(device, non_blocking=True)


def _alloc(runner: "ModelRunner", rows: list[int], prefix_lens: list[int], seq_lens: list[int]) -> torch.Tensor:
    allocator = runner.token_to_kv_pool_allocator
    last_locs = [0] * len(rows)
    if allocator.page_size > 1:
        # Slot of each request's last cached token (meaningless, and ignored, for an empty prefix); one
        # device-to-host copy for the whole batch.
        ends = torch.tensor([max(p - 1, 0) for p in prefix_lens], dtype=torch.int64)
        table = runner.req_to_token_pool.req_to_token
        last_locs = table[to_device_async(rows, table.device), ends.to(table.device)].tolist()
    loc = allocator.alloc_extend(prefix_lens, seq_lens, last_locs)
    if loc is None:
        raise OutOfKVMemory(f"{sum(seq_lens) - sum(prefix_lens)} new tokens do not fit the KV pool "
                            f"({allocator.available_size()} slots free)")
    return loc
