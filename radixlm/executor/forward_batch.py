"""From the scheduler's ``Batch`` (host lists) to a ``ForwardBatch`` (device tensors), in a few pinned copies."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from radixlm.core import Batch, ForwardBatch, ForwardMode
from radixlm.mem.allocator import token_positions
from radixlm.utils.device import to_device_async

if TYPE_CHECKING:
    from radixlm.executor.model_runner import ModelRunner


def build_forward_batch(batch: Batch, runner: "ModelRunner", prev_ids: torch.Tensor | None,
                        dp_step: tuple[list[int], bool] | None = None) -> ForwardBatch:
    """The device view of ``batch``; ``prev_ids`` ([rows of the previous step] int64 on the device) are the
    previous step's samples, which ``batch.input_ids`` may refer to as ``-(row + 1)``; ``dp_step``: every DP
    rank's new tokens and whether every rank's step is graph-compatible (data-parallel attention)."""
    device = runner.device
    bs = batch.batch_size
    seq_lens = [p + e for p, e in zip(batch.prefix_lens, batch.extend_lens)]
    common = dict(req_to_token_pool=runner.memory.req_to_token_pool, kv_pool=runner.kv_pool,
                  attn_backend=runner.attn_backend, return_hidden_states=batch.return_hidden_states,
                  dp_token_counts=None if dp_step is None else dp_step[0],
                  dp_all_decode=dp_step is not None and dp_step[1])
    if batch.mode.is_idle:
        empty = torch.empty(0, dtype=torch.int64, device=device)
        return ForwardBatch(ForwardMode.IDLE, 0, empty, empty, empty, empty, [], empty, **common)
    input_ids = _input_ids(batch.input_ids, prev_ids, device)
    if batch.mode.is_decode:
        # One upload: rows, positions (the tokens already in KV), seq_lens.
        cols = to_device_async(torch.tensor([batch.req_pool_indices, batch.prefix_lens, seq_lens]), device)
        positions = cols[1] if batch.mrope_positions is None else to_device_async(batch.mrope_positions, device)
        fb = ForwardBatch(ForwardMode.DECODE, bs, input_ids, positions, cols[0], cols[2], seq_lens,
                          batch.out_cache_loc, **common)
    else:
        prefix, extend = torch.tensor(batch.prefix_lens), torch.tensor(batch.extend_lens)
        starts = extend.cumsum(0) - extend
        if batch.mrope_positions is not None:
            positions = batch.mrope_positions
        elif batch.verify is not None:  # a draft token sits at its depth in the tree, after the prefix
            positions = torch.cat([p + m.sum(dim=1) - 1 for p, m in zip(batch.prefix_lens, batch.verify.masks)])
        else:
            positions = token_positions(prefix, prefix + extend)[1]
        # One upload for the [bs] columns, one for the positions.
        cols = to_device_async(torch.stack([torch.tensor(batch.req_pool_indices), prefix + extend, prefix, extend,
                                            starts]), device)
        fb = ForwardBatch(batch.mode, bs, input_ids, to_device_async(positions, device), cols[0], cols[1], seq_lens,
                          batch.out_cache_loc, extend_prefix_lens=cols[2], extend_seq_lens=cols[3],
                          extend_start_loc=cols[4], extend_prefix_lens_cpu=list(batch.prefix_lens),
                          extend_seq_lens_cpu=list(batch.extend_lens),
                          extend_logits_start_cpu=_logits_starts(batch), **common)
        if batch.verify is not None:
            masks = [m.to(torch.bool).reshape(-1) for m in batch.verify.masks]
            sizes = torch.tensor([m.numel() for m in masks])
            fb.custom_mask = to_device_async(torch.cat(masks), device)
            fb.mask_indptr = to_device_async(sizes.cumsum(0) - sizes, device)
    if runner.lora is not None:
        graph = runner.cuda_graph_runner
        # a decode step a graph will replay gets the layout of the graph's padded size
        rows = graph.padded_size(fb) if graph is not None and batch.mode.is_decode else None
        fb.lora = runner.lora.prepare(batch, rows)
    if batch.input_embeds:
        index = torch.cat([torch.arange(i, i + e.shape[0]) for i, e in batch.input_embeds])
        values = torch.cat([e for _, e in batch.input_embeds]).to(runner.model_config.dtype)
        fb.embed_overrides = (to_device_async(index, device), to_device_async(values, device))
    return fb


def _input_ids(ids: list[int], prev_ids: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """New token ids on the device, placeholders ``-(j + 1)`` replaced by ``prev_ids[j]`` there."""
    if not ids or min(ids) >= 0:
        return to_device_async(ids, device)
    assert prev_ids is not None, "a batch refers to the previous step's tokens, but no step ran before it"
    if prev_ids.numel() == len(ids) and ids == list(range(-1, -len(ids) - 1, -1)):
        return prev_ids  # the same rows in the same order: the common chained decode step
    host = torch.tensor(ids)
    placeholder = host < 0
    cols = to_device_async(torch.stack([host.clamp(min=0), (-host - 1).clamp(min=0), placeholder.long()]), device)
    return torch.where(cols[2].bool(), prev_ids[cols[1]], cols[0])


def _logits_starts(batch: Batch) -> list[int] | None:
    """Per row, the index among its new tokens from which every token's logits are needed (prompt logprobs:
    the token at position q + 1 is scored by the logits at q), or None when no row needs more than its last."""
    if batch.input_logprob_start is None or all(s is None for s in batch.input_logprob_start):
        return None
    out = []
    for start, prefix, ext in zip(batch.input_logprob_start, batch.prefix_lens, batch.extend_lens):
        out.append(ext - 1 if start is None else max(0, min(start - 1 - prefix, ext - 1)))
    return out
