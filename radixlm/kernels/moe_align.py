"""Grouping a mixture-of-experts batch by expert, for the grouped GEMM of ``radixlm.kernels.moe_gemm``.

Each token chooses ``top_k`` experts, giving ``num_pairs = num_tokens * top_k`` (token, expert) pairs, numbered
``pair = token * top_k + k`` as in the row-major ``topk_ids``.  The GEMM works on blocks of ``block_m`` pairs
that share one expert (so one weight tile serves the whole block), so the pairs are sorted by expert and each
expert's run is padded up to a multiple of ``block_m`` with a sentinel pair id ``num_pairs``.

How many blocks there are depends on the routing, i.e. on device values.  Reading that count on the host would
stall the stream and break CUDA-graph capture, so the outputs are sized by a static upper bound instead and the
real padded length stays on the device (``num_padded``); GEMM programs past it exit at once.

Two implementations with one contract: a single-program Triton kernel (one launch, for the small batches of
decode, where a dozen torch launches would cost more than the expert GEMMs of a small model) and torch ops
(sort-based, parallel, for large batches; ``bincount`` syncs on CUDA to size its output, so counts are a
``scatter_add``).  ``align_pairs_by_expert`` picks by size.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


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


# Above these the torch ops win (H200, bench/gpu/fused_moe.py): the single program's passes grow with pairs x
# experts (1536 pairs x 64 experts: 56 us vs 78; 2048 x 128: 124 vs 79; 8192 x 8: 192 vs 122).
_KERNEL_MAX_PAIRS = 2048
_KERNEL_MAX_WORK = 150_000  # pairs x experts


def align_pairs_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> AlignedPairs:
    """Sort the pairs of ``topk_ids`` [num_tokens, top_k] (int32/int64, values in [0, num_experts)) by expert,
    padding each expert's run to a multiple of ``block_m``; the output contract is ``align_pairs_torch``'s.  The
    Triton kernel for small batches, torch ops for large ones; both without a host sync."""
    if topk_ids.numel() <= _KERNEL_MAX_PAIRS and topk_ids.numel() * num_experts <= _KERNEL_MAX_WORK:
        return align_pairs_triton(topk_ids, num_experts, block_m)
    return align_pairs_torch(topk_ids, num_experts, block_m)


def align_pairs_torch(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> AlignedPairs:
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


@triton.jit
def _align_kernel(
    ids_ptr, sorted_pair_ids_ptr, block_expert_ids_ptr, num_padded_ptr, num_pairs, num_experts, max_padded,
    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr, PAD_CHUNK: tl.constexpr,
):
    """One program; every pass walks its range in CHUNK-sized steps, matching elements against all experts with
    a [CHUNK, BLOCK_E] comparison (registers have no gather)."""
    experts = tl.arange(0, BLOCK_E)
    lane = tl.arange(0, CHUNK)

    # Pass 1: pairs per expert.
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for start in range(0, num_pairs, CHUNK):
        ids = tl.load(ids_ptr + start + lane, mask=start + lane < num_pairs, other=BLOCK_E).to(tl.int32)
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_end = tl.cumsum(padded, axis=0)  # [BLOCK_E]; experts >= num_experts have no pairs, so no padding
    padded_start = padded_end - padded
    tl.store(num_padded_ptr, tl.sum(padded, axis=0).to(tl.int64))

    # Pass 2: each pair's slot = its expert's padded start + the pairs of that expert before it (stable).
    seen = tl.zeros((BLOCK_E,), dtype=tl.int32)  # pairs per expert in the chunks so far
    for start in range(0, num_pairs, CHUNK):
        pairs = start + lane
        ids = tl.load(ids_ptr + pairs, mask=pairs < num_pairs, other=BLOCK_E).to(tl.int32)
        onehot = (ids[:, None] == experts[None, :]).to(tl.int32)  # [CHUNK, BLOCK_E]
        earlier = (ids[:, None] == ids[None, :]) & (lane[None, :] < lane[:, None])  # [CHUNK, CHUNK]
        slot = tl.sum(onehot * (padded_start + seen)[None, :], axis=1) + tl.sum(earlier.to(tl.int32), axis=1)
        tl.store(sorted_pair_ids_ptr + slot, pairs, mask=pairs < num_pairs)
        seen += tl.sum(onehot, axis=0)

    # Pass 3: padding slots (disjoint from pass 2's, so no barrier): each expert's last block past its pairs,
    # as one [BLOCK_E, PAD_CHUNK] tile per chunk of the block, then everything past the last run.
    pad_from = padded_start + counts
    for j in tl.static_range(0, BLOCK_M, PAD_CHUNK):
        slots = pad_from[:, None] + j + tl.arange(0, PAD_CHUNK)[None, :]
        tl.store(sorted_pair_ids_ptr + slots, num_pairs, mask=slots < padded_end[:, None])
    for start in range(tl.sum(padded, axis=0), max_padded, CHUNK):
        tl.store(sorted_pair_ids_ptr + start + lane, num_pairs, mask=start + lane < max_padded)

    # Pass 4: a block's expert is the number of padded runs ending at or before its first slot.
    for start in range(0, max_padded // BLOCK_M, CHUNK):
        blocks = start + lane
        expert = tl.sum((padded_end[None, :] <= (blocks * BLOCK_M)[:, None]).to(tl.int32), axis=1)
        expert = tl.minimum(expert, num_experts)
        tl.store(block_expert_ids_ptr + blocks, expert, mask=blocks < max_padded // BLOCK_M)


def align_pairs_triton(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> AlignedPairs:
    """``align_pairs_torch``'s result from one single-program Triton launch (``num_experts`` <= 1024)."""
    num_pairs = topk_ids.numel()
    max_padded = max_padded_pairs(num_pairs, num_experts, block_m)
    device = topk_ids.device
    sorted_pair_ids = torch.empty(max_padded, dtype=torch.int32, device=device)
    block_expert_ids = torch.empty(max_padded // block_m, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int64, device=device)
    block_e = triton.next_power_of_2(num_experts)
    _align_kernel[(1,)](
        topk_ids.reshape(-1), sorted_pair_ids, block_expert_ids, num_padded, num_pairs, num_experts, max_padded,
        BLOCK_M=block_m, BLOCK_E=block_e, CHUNK=max(16, min(64, 8192 // block_e)),
        PAD_CHUNK=min(block_m, max(1, 4096 // block_e)),
        num_warps=4 if block_e <= 128 else 8,
    )
    return AlignedPairs(sorted_pair_ids, block_expert_ids, num_padded)
