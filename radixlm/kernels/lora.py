"""Batched heterogeneous LoRA (S-LoRA / Punica style): the shrink ``x @ A^T`` and the scaled, in-place expand
``y += scaling * (tmp @ B^T)`` over a batch whose tokens are grouped into segments by adapter, each adapter's
weights gathered from a pool of slots, all segments in one launch.

Adapter pool (one per target projection; a merged projection's slices, q/k/v or gate/up, share it):

    a_pool   [num_slots, num_slices * max_rank, K]   rows [s * max_rank, s * max_rank + rank) are slice s's A
    b_pool   [num_slots, N_total, max_rank]           rows [offsets[s], offsets[s + 1]) are slice s's B
    ranks    [num_slots] int32                        a slot's rank (<= max_rank); the kernels read no A/B entry
                                                      beyond it, so the padding need not be zero.  Rank 0: the
                                                      slot's adapter leaves this projection alone; its tokens are
                                                      treated like slot -1 (no work, nothing written)
    scalings [num_slots] float32                      alpha / rank (or rsLoRA's alpha / sqrt(rank))

Batch (``LoraSegments``, built on the host by ``build_segments`` once per batch, shared by every layer): tokens
``[seg_starts[i], seg_starts[i + 1])`` use pool slot ``seg_slots[i]``, or no adapter when it is -1 (those tokens'
rows of ``y`` are not touched, their ``tmp`` rows not written).  Segments may be empty or one token long.

The intermediate ``tmp`` is ``[split_k, T, num_slices * max_rank]``: partial products over ``split_k`` ranges of
K (the shrink's programs share a long K: a decode batch has few segments), which the expand adds in split order,
so the result does not depend on scheduling.  ``split_k`` is the shrink's choice (1 on CPU).

Numerics: ``tmp`` is float32 whatever the model dtype: the intermediate is tiny (``T x num_slices x max_rank``)
and keeping it unrounded removes one rounding of a bf16 product from the adapter's contribution.  The shrink
multiplies x and A in their dtype with fp32 accumulation; the expand multiplies fp32 ``tmp`` by B widened to
fp32 (tf32 tensor-core inputs for a half-precision pool, whose values tf32 holds exactly; IEEE fp32 for a float32
pool), adds ``scaling *`` the product to y in fp32 and rounds once to y's dtype.

Strides: x and y may be row views of wider tensors (any row stride, unit column stride); pools and metadata are
contiguous.  ``tmp`` is contiguous.

Graph safety: nothing here reads a device value on the host or allocates besides ``lora_shrink``'s output.  The
launch grid depends only on host ints: the number of tokens, of segments, and ``max_seg_len``, an upper bound on
the adapter segments' lengths (``LoraSegments.max_seg_len``; default: the number of tokens, always valid; slot -1
segments do no work, so their length is free).  A CUDA graph
captures one layout size (the token count, the segment count, ``max_seg_len``) and replays with new metadata
copied into the same tensors: decode with one segment per request (``merge=False``: ``max_seg_len`` 1, the
GEMV form), or requests sorted by adapter, merged, cut into pieces of ``split`` tokens and padded to
``build_segments``' segment bound (``max_seg_len`` = split, the dot form: fewer programs, each B tile read once
per piece instead of once per request).

Base-only fast path: ``LoraSegments.has_lora`` is a host bool (from the host slot list); ``apply_lora`` returns
at once when it is false, so a batch without adapters launches nothing.  A captured graph must not take that
path when a replay may carry adapters.

CUDA tensors run the Triton kernels (``radixlm.kernels.lora_triton``, imported on first CUDA call); others run
``lora_shrink_ref`` / ``lora_expand_ref`` (loops over segments in torch), the definitions the kernels are tested
against and the CPU path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch


class LoraWeights(NamedTuple):
    """One projection's adapter pool (module docstring), in ``apply_lora``'s argument order."""

    a_pool: torch.Tensor  # [num_slots, num_slices * max_rank, K]
    b_pool: torch.Tensor  # [num_slots, N_total, max_rank]
    ranks: torch.Tensor  # [num_slots] int32
    scalings: torch.Tensor  # [num_slots] float32
    slice_offsets: torch.Tensor  # [num_slices + 1] int32


class LoraSegments(NamedTuple):
    """One batch's adapter layout (module docstring)."""

    seg_starts: torch.Tensor  # [num_segs + 1] int32, token offsets, non-decreasing, seg_starts[0] == 0
    seg_slots: torch.Tensor  # [num_segs] int32, pool slot or -1 (no adapter)
    max_seg_len: int  # host bound on every adapter (slot >= 0) segment's length, >= 1: the kernels' grid
    has_lora: bool  # host: some segment has a slot >= 0 (segments built here have tokens)


def build_segments(
    slots: Sequence[int],  # per request: pool slot or -1
    num_tokens: Sequence[int],  # per request: tokens in this batch (1 in decode)
    device: torch.device | str,
    *,
    merge: bool = True,
    split: int | None = None,
    num_segs: int | None = None,
) -> LoraSegments:
    """Segments over requests in batch order (the tokens are not reordered: a caller that wants few segments sorts
    its requests by slot first; requests without tokens make no segment).  ``merge``: consecutive requests of one
    slot share a segment; else one segment per request.  ``split``: cut adapter segments (slot -1 ones need no
    work, so they stay whole) into pieces of at most ``split`` tokens, so the grid holds one token tile per
    segment instead of the segment count times the longest segment's tiles.  ``num_segs``: pad with empty slot -1
    segments up to this count (a CUDA graph's fixed shape; ValueError if the layout needs more).  With ``split``,
    T tokens in g runs (g requests with tokens, or with ``merge`` the distinct slots, -1 included, of a batch
    sorted by slot) make at most ``cdiv(T, split) + g - 1`` segments: the count a graph of T tokens pads to."""
    if len(slots) != len(num_tokens):
        raise ValueError(f"{len(slots)} slots for {len(num_tokens)} requests")
    runs: list[list[int]] = []  # [slot, tokens]
    for slot, n in zip(slots, num_tokens):
        if n == 0:
            continue
        if merge and runs and runs[-1][0] == slot:
            runs[-1][1] += n
        else:
            runs.append([slot, n])
    starts, seg_slots = [0], []
    for slot, n in runs:
        whole = split is None or n <= split or slot < 0
        pieces = [n] if whole else [split] * (n // split) + ([n % split] if n % split else [])
        for piece in pieces:
            seg_slots.append(slot)
            starts.append(starts[-1] + piece)
    if num_segs is not None:
        if num_segs < len(seg_slots):
            raise ValueError(f"{len(seg_slots)} segments do not fit in {num_segs}")
        seg_slots += [-1] * (num_segs - len(seg_slots))
        starts += [starts[-1]] * (num_segs + 1 - len(starts))
    return LoraSegments(
        torch.tensor(starts, dtype=torch.int32, device=device),
        torch.tensor(seg_slots, dtype=torch.int32, device=device),
        max((n if split is None else min(n, split) for slot, n in runs if slot >= 0), default=1),
        any(slot >= 0 for slot, _ in runs),
    )


def lora_shrink(
    x: torch.Tensor,  # [T, K], unit column stride
    a_pool: torch.Tensor,  # [num_slots, num_slices * max_rank, K], contiguous
    seg_starts: torch.Tensor,  # [num_segs + 1] int32
    seg_slots: torch.Tensor,  # [num_segs] int32
    ranks: torch.Tensor,  # [num_slots] int32
    num_slices: int,
    max_seg_len: int | None = None,
) -> torch.Tensor:  # [split_k, T, num_slices * max_rank] float32, contiguous
    """``tmp.sum(0)[t, s * R + r] = x[t] . A_slot[s * R + r]`` for the tokens of adapter segments and r < rank;
    columns r >= rank are 0; rows of slot -1 (or rank 0) tokens are unspecified (not written)."""
    if x.is_cuda:
        from radixlm.kernels.lora_triton import lora_shrink_triton

        return lora_shrink_triton(x, a_pool, seg_starts, seg_slots, ranks, num_slices, max_seg_len)
    return lora_shrink_ref(x, a_pool, seg_starts, seg_slots, ranks, num_slices)


def lora_expand(
    tmp: torch.Tensor,  # [split_k, T, num_slices * max_rank] float32, contiguous (lora_shrink's output)
    b_pool: torch.Tensor,  # [num_slots, N_total, max_rank], contiguous
    seg_starts: torch.Tensor,  # [num_segs + 1] int32
    seg_slots: torch.Tensor,  # [num_segs] int32
    ranks: torch.Tensor,  # [num_slots] int32
    scalings: torch.Tensor,  # [num_slots] float32
    slice_offsets: torch.Tensor,  # [num_slices + 1] int32 on y's device: slice s owns columns [o[s], o[s + 1])
    y: torch.Tensor,  # [T, N_total], unit column stride; updated in place
    max_seg_len: int | None = None,
) -> None:
    """``y[t, o[s]:o[s+1]] += scaling * T[t, s*R : s*R + rank] @ B_slot[o[s]:o[s+1], :rank]^T`` with ``T =
    tmp.sum(0)`` (added in split order) for the tokens of adapter segments; rows of slot -1 (or rank 0) tokens are
    left bit-unchanged."""
    if y.is_cuda:
        from radixlm.kernels.lora_triton import lora_expand_triton

        lora_expand_triton(tmp, b_pool, seg_starts, seg_slots, ranks, scalings, slice_offsets, y, max_seg_len)
        return
    lora_expand_ref(tmp, b_pool, seg_starts, seg_slots, ranks, scalings, slice_offsets, y)


def apply_lora(
    x: torch.Tensor,  # [T, K]
    y: torch.Tensor,  # [T, N_total], the base projection's output; updated in place
    a_pool: torch.Tensor,
    b_pool: torch.Tensor,
    ranks: torch.Tensor,
    scalings: torch.Tensor,
    slice_offsets: torch.Tensor,
    segments: LoraSegments,
) -> None:
    """Shrink then expand one projection's adapters into ``y``; nothing at all when ``segments.has_lora`` is
    false (the base-only fast path, decided on the host)."""
    if not segments.has_lora:
        return
    num_slices = slice_offsets.shape[0] - 1
    tmp = lora_shrink(x, a_pool, segments.seg_starts, segments.seg_slots, ranks, num_slices, segments.max_seg_len)
    lora_expand(tmp, b_pool, segments.seg_starts, segments.seg_slots, ranks, scalings, slice_offsets, y,
                segments.max_seg_len)


def lora_shrink_ref(
    x: torch.Tensor, a_pool: torch.Tensor, seg_starts: torch.Tensor, seg_slots: torch.Tensor, ranks: torch.Tensor,
    num_slices: int,
) -> torch.Tensor:
    """``lora_shrink`` in torch, one matmul per segment and slice in float32 (reads the metadata on the host);
    ``split_k`` 1; rows of slot -1 (or rank 0) tokens are 0."""
    max_rank = a_pool.shape[1] // num_slices
    tmp = torch.zeros(1, x.shape[0], num_slices * max_rank, dtype=torch.float32, device=x.device)
    starts, slots, rank_list = seg_starts.tolist(), seg_slots.tolist(), ranks.tolist()
    for i, slot in enumerate(slots):
        begin, end = starts[i], starts[i + 1]
        if slot < 0 or begin == end or rank_list[slot] == 0:
            continue
        rank, xs = rank_list[slot], x[begin:end].float()
        for s in range(num_slices):
            a = a_pool[slot, s * max_rank:s * max_rank + rank].float()  # [rank, K]
            tmp[0, begin:end, s * max_rank:s * max_rank + rank] = xs @ a.T
    return tmp


def lora_expand_ref(
    tmp: torch.Tensor, b_pool: torch.Tensor, seg_starts: torch.Tensor, seg_slots: torch.Tensor, ranks: torch.Tensor,
    scalings: torch.Tensor, slice_offsets: torch.Tensor, y: torch.Tensor,
) -> None:
    """``lora_expand`` in torch: per segment and slice, ``y`` rows += scaling * product, in float32, rounded once
    to y's dtype (reads the metadata on the host)."""
    num_slices = slice_offsets.shape[0] - 1
    max_rank = tmp.shape[2] // num_slices
    total = tmp[0].clone()
    for partial in tmp[1:]:  # in split order, as the kernel adds them
        total += partial
    starts, slots, rank_list = seg_starts.tolist(), seg_slots.tolist(), ranks.tolist()
    offsets, scale_list = slice_offsets.tolist(), scalings.tolist()
    for i, slot in enumerate(slots):
        begin, end = starts[i], starts[i + 1]
        if slot < 0 or begin == end or rank_list[slot] == 0:
            continue
        rank = rank_list[slot]
        delta = torch.empty(end - begin, y.shape[1], dtype=torch.float32, device=y.device)
        for s in range(num_slices):
            b = b_pool[slot, offsets[s]:offsets[s + 1], :rank].float()  # [width, rank]
            delta[:, offsets[s]:offsets[s + 1]] = total[begin:end, s * max_rank:s * max_rank + rank] @ b.T
        y[begin:end] = (y[begin:end].float() + scale_list[slot] * delta).to(y.dtype)
