"""Grouping a mixture-of-experts batch by expert, for the grouped GEMM of ``radixlm.kernels.moe_gemm``.

Each token chooses ``top_k`` experts, giving ``num_pairs = num_tokens * top_k`` (token, expert) pairs, numbered
``pair = token * top_k + k`` as in the row-major ``topk_ids``.  The GEMM works on blocks of ``block_m`` pairs
that share one expert (so one weight tile serves the whole block), so the pairs are sorted by expert and each
expert's run is padded up to a multiple of ``block_m`` with a sentinel pair id ``num_pairs``.

How many blocks there are depends on the routing, i.e. on device values.  Reading that count on the host would
stall the stream and break CUDA-graph capture, so the outputs are sized by a static upper bound instead and the
real padded length stays on the device (``num_padded``); GEMM programs past it exit at once.  Only torch ops
without a host sync are used (``bincount`` syncs on CUDA to size its output, so counts are a ``scatter_add``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class AlignedPairs(NamedTuple):
    sorted_pair_ids: torch.Tensor  # [max_padded] int32: pair ids grouped by expert; padding = num_pairs
    block_expert_ids: torch.Tensor  # [max_padded // block_m] int32: each block's expert; num_experts past the end
    num_padded: torch.Tensor  # [1] int64 on the device: the used length of sorted_pair_ids


def max_padded_pairs(num_pairs: int, num_experts: int, block_m: int) -> int:
    """A static bound on the padded length, a multiple of ``block_m``: each expert that receives pairs adds at
    most ``block_m - 1`` padding, and at most ``min(num_experts, num_pairs)`` experts receive any.  (The
    ``num_pairs`` cap keeps decode grids small: one token with top-8 of 256 experts needs 8 blocks, not 256.)"""
    bound = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return (bound + block_m - 1) // block_m * block_m


def align_pairs_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> AlignedPairs:
    """Sort the pairs of ``topk_ids`` [num_tokens, top_k] (int32/int64, values in [0, num_experts)) by expert,
    padding each expert's run to a multiple of ``block_m``.

    Within an expert the pairs keep their order (a stable sort), experts come in increasing order, and experts
    with no pair take no block.  Blocks past ``num_padded`` hold only padding and have expert id
    ``num_experts``.  No host sync: capturable in a CUDA graph.
    """
    device = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)  # [num_pairs]
    num_pairs = flat.numel()
    max_padded = max_padded_pairs(num_pairs, num_experts, block_m)

    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # [num_experts]
    padded_end = torch.cumsum((counts + block_m - 1) // block_m * block_m, 0)  # [num_experts], exclusive ends
    padded_start = padded_end - (counts + block_m - 1) // block_m * block_m
    first_sorted = torch.cumsum(counts, 0) - counts  # [num_experts]: where each expert's run starts, unpadded

    sorted_experts, order = torch.sort(flat, stable=True)  # [num_pairs] each
    # A pair's slot: its expert's padded start plus its rank within the expert's run.
    rank = torch.arange(num_pairs, device=device) - first_sorted[sorted_experts]
    dest = padded_start[sorted_experts] + rank  # [num_pairs]
    sorted_pair_ids = torch.full((max_padded,), num_pairs, dtype=torch.int32, device=device)
    sorted_pair_ids.scatter_(0, dest, order.to(torch.int32))

    # Block b starts at slot b * block_m, inside the expert whose padded run ends after it: the number of runs
    # ending at or before that slot (empty experts' runs end where their predecessor's do).
    block_starts = torch.arange(0, max_padded, block_m, device=device)
    block_expert_ids = torch.searchsorted(padded_end, block_starts, right=True).to(torch.int32)
    return AlignedPairs(sorted_pair_ids, block_expert_ids, padded_end[-1:])
