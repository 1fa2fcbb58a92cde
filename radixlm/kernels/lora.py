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

Batch (``LoraSegments``, built on the host by ``build_segments`` once per batch, shared by every layer): positions
``[seg_starts[i], seg_starts[i + 1])`` use pool slot ``seg_slots[i]``, or no adapter when it is -1 (those tokens'
rows of ``y`` are not touched, their ``tmp`` rows not written).  Segments may be empty or one token long.  A
position is a token of x and y, or with ``token_order`` the token ``token_order[position]``: a batch grouped by
adapter without moving its tokens (the kernels gather x's rows and scatter into y's; ``tmp`` stays in position
order).

The intermediate ``tmp`` is ``[1, T, num_slices * max_rank]``.  The shrink's programs split a long K (a decode
batch has few segments) and the last split of each tile to finish adds the partials in split order (serial
split-K), so the result does not depend on scheduling and the expand reads one plane.

Numerics: ``tmp`` is float32 whatever the model dtype (the K splits are summed unrounded).  The shrink multiplies
x and A in their dtype with fp32 accumulation.  The expand's dot form (segments of several tokens) multiplies
``tmp`` rounded to a half-precision pool's dtype by B on the tensor cores (one rounding of the intermediate, as a
half-precision PEFT model has; GPU run L10: 20 % less expand time than tf32 inputs), its GEMV form (one-token
segments) in fp32; a float32 pool multiplies in IEEE fp32.  The product is scaled, added to y in fp32 and rounded
once to y's dtype.

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

Overlap: ``lora_forward`` (what the linear layers call) takes the base projection as a callable and, on CUDA,
runs the shrink on a side stream concurrently with it; the expand then adds into the base output.  ``apply_lora``
is the same sum, serial, on a computed ``y``.

Base-only fast path: ``LoraSegments.has_lora`` is a host bool (from the host slot list); ``apply_lora`` returns
at once when it is false, so a batch without adapters launches nothing.  A captured graph must not take that
path when a replay may carry adapters.

CUDA tensors run the Triton kernels (``radixlm.kernels.lora_triton``, imported on first CUDA call); others run
``lora_shrink_ref`` / ``lora_expand_ref`` (loops over segments in torch), the definitions the kernels are tested
against and the CPU path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
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

    seg_starts: torch.Tensor  # [num_segs + 1] int32, offsets in segment order, non-decreasing, seg_starts[0] == 0
    seg_slots: torch.Tensor  # [num_segs] int32, pool slot or -1 (no adapter)
    max_seg_len: int  # host bound on every adapter (slot >= 0) segment's length, >= 1: the kernels' grid
    has_lora: bool  # host: some segment has a slot >= 0 (segments built here have tokens)
    # [T] int32: position k in segment order is token token_order[k] of x and y (a batch grouped by adapter
    # without moving its tokens); None: the identity
    token_order: torch.Tensor | None = None


def build_segments(
    slots: Sequence[int],  # per request: pool slot or -1
    num_tokens: Sequence[int],  # per request: tokens in this batch (1 in decode)
    device: torch.device | str,
    *,
    merge: bool = True,
    split: int | None = None,
    num_segs: int | None = None,
    sort: bool = False,
    num_order: int | None = None,
) -> LoraSegments:
    """Segments over requests in batch order (requests without tokens make no segment), or with ``sort`` in the
    order of their slots (stable; ``token_order`` then maps segment order to the batch's tokens, which do not
    move: one segment per adapter instead of one per run of it).  ``merge``: consecutive requests of one
    slot share a segment; else one segment per request.  ``split``: cut adapter segments (slot -1 ones need no
    work, so they stay whole) into pieces of at most ``split`` tokens, so the grid holds one token tile per
    segment instead of the segment count times the longest segment's tiles.  ``num_segs``: pad with empty slot -1
    segments up to this count (a CUDA graph's fixed shape; ValueError if the layout needs more).  With ``split``,
    T tokens in g runs (g requests with tokens, or with ``merge`` the distinct slots, -1 included, of a batch
    sorted by slot) make at most ``cdiv(T, split) + g - 1`` segments: the count a graph of T tokens pads to.
    ``num_order``: with ``sort``, pad ``token_order`` to this length (a graph's token count) with its identity tail.
    """
    if len(slots) != len(num_tokens):
        raise ValueError(f"{len(slots)} slots for {len(num_tokens)} requests")
    order = sorted(range(len(slots)), key=lambda i: slots[i]) if sort else range(len(slots))
    runs: list[list[int]] = []  # [slot, tokens]
    for slot, n in ((slots[i], num_tokens[i]) for i in order):
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
    token_order = None
    if sort:
        first = [0]
        for n in num_tokens:
            first.append(first[-1] + n)
        tokens = [t for i in order for t in range(first[i], first[i + 1])]
        if num_order is not None:
            if num_order < len(tokens):
                raise ValueError(f"{len(tokens)} tokens do not fit a token order of {num_order}")
            tokens += range(len(tokens), num_order)
        token_order = torch.tensor(tokens, dtype=torch.int32, device=device)
    return LoraSegments(
        torch.tensor(starts, dtype=torch.int32, device=device),
        torch.tensor(seg_slots, dtype=torch.int32, device=device),
        max((n if split is None else min(n, split) for slot, n in runs if slot >= 0), default=1),
        any(slot >= 0 for slot, _ in runs),
        token_order,
    )


DECODE_PIECE = 16  # one-token rows per segment piece of the sorted decode layout: the dot form's smallest BLOCK_M


def decode_layout(rows: int, num_slots: int) -> tuple[int | None, int]:
    """(split, segment count) of the decode layout of ``rows`` one-token rows over a pool of ``num_slots``: up
    to ``DECODE_PIECE`` rows one segment per row (split None, the GEMV form); beyond, rows grouped by slot through
    ``token_order`` in pieces of ``DECODE_PIECE`` (the dot form: each B tile read once per piece instead of once
    per row; GPU run L1 measured 3-5x less expand time at 128 rows), at most ``cdiv(rows, DECODE_PIECE) +
    num_slots`` segments (the runs are the slots and -1)."""
    if rows <= DECODE_PIECE:
        return None, rows
    return DECODE_PIECE, -(-rows // DECODE_PIECE) + num_slots


def decode_segments(slots: Sequence[int], num_slots: int, device: torch.device | str,
                    rows: int | None = None) -> LoraSegments:
    """Decode's ``LoraSegments`` for one-token rows of ``slots`` (pool slot or -1), in ``decode_layout``'s
    fixed shape for ``rows`` rows (default: ``len(slots)``; more pads with rows of no adapter: a CUDA graph's
    batch size), so that every batch of ``rows`` rows has the same tensor shapes and ``max_seg_len``."""
    rows = len(slots) if rows is None else rows
    if rows < len(slots):
        raise ValueError(f"{len(slots)} decode rows do not fit a layout of {rows}")
    padded = list(slots) + [-1] * (rows - len(slots))
    split, num_segs = decode_layout(rows, num_slots)
    if split is None:
        seg = build_segments(padded, [1] * rows, device, merge=False)
        return seg._replace(max_seg_len=1)
    seg = build_segments(padded, [1] * rows, device, sort=True, split=split, num_segs=num_segs, num_order=rows)
    return seg._replace(max_seg_len=split)


def lora_shrink(
    x: torch.Tensor,  # [T, K], unit column stride
    a_pool: torch.Tensor,  # [num_slots, num_slices * max_rank, K], contiguous
    seg_starts: torch.Tensor,  # [num_segs + 1] int32
    seg_slots: torch.Tensor,  # [num_segs] int32
    ranks: torch.Tensor,  # [num_slots] int32
    num_slices: int,
    max_seg_len: int | None = None,
    token_order: torch.Tensor | None = None,  # [T] int32 (LoraSegments.token_order)
) -> torch.Tensor:  # [1, T, num_slices * max_rank] float32, contiguous
    """``tmp[0, k, s * R + r] = x[order[k]] . A_slot[s * R + r]`` for the positions k of adapter segments (in
    segment order; ``order`` the identity without ``token_order``) and r < rank; columns r >= rank are 0; rows of
    slot -1 (or rank 0) positions are unspecified (not written)."""
    if x.is_cuda:
        from radixlm.kernels.lora_triton import lora_shrink_triton

        return lora_shrink_triton(x, a_pool, seg_starts, seg_slots, ranks, num_slices, max_seg_len,
                                  token_order=token_order)
    return lora_shrink_ref(x, a_pool, seg_starts, seg_slots, ranks, num_slices, token_order)


def lora_expand(
    tmp: torch.Tensor,  # [1, T, num_slices * max_rank] float32, contiguous (lora_shrink's output)
    b_pool: torch.Tensor,  # [num_slots, N_total, max_rank], contiguous
    seg_starts: torch.Tensor,  # [num_segs + 1] int32
    seg_slots: torch.Tensor,  # [num_segs] int32
    ranks: torch.Tensor,  # [num_slots] int32
    scalings: torch.Tensor,  # [num_slots] float32
    slice_offsets: torch.Tensor,  # [num_slices + 1] int32 on y's device: slice s owns columns [o[s], o[s + 1])
    y: torch.Tensor,  # [T, N_total], unit column stride; updated in place
    max_seg_len: int | None = None,
    token_order: torch.Tensor | None = None,  # [T] int32 (LoraSegments.token_order)
) -> None:
    """``y[order[k], o[s]:o[s+1]] += scaling * T[k, s*R : s*R + rank] @ B_slot[o[s]:o[s+1], :rank]^T`` with ``T =
    tmp[0]`` for the positions k of adapter segments; rows of slot -1 (or rank 0) tokens are left
    bit-unchanged."""
    if y.is_cuda:
        from radixlm.kernels.lora_triton import lora_expand_triton

        lora_expand_triton(tmp, b_pool, seg_starts, seg_slots, ranks, scalings, slice_offsets, y, max_seg_len,
                           token_order=token_order)
        return
    lora_expand_ref(tmp, b_pool, seg_starts, seg_slots, ranks, scalings, slice_offsets, y, token_order)


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
    tmp = lora_shrink(x, a_pool, segments.seg_starts, segments.seg_slots, ranks, num_slices, segments.max_seg_len,
                      segments.token_order)
    lora_expand(tmp, b_pool, segments.seg_starts, segments.seg_slots, ranks, scalings, slice_offsets, y,
                segments.max_seg_len, segments.token_order)


def lora_forward(
    x: torch.Tensor,  # [T, K], the projection's input
    base: Callable[[], torch.Tensor],  # the base projection of x: returns y [T, N_total], a fresh tensor
    weights: LoraWeights,
    segments: LoraSegments,
) -> torch.Tensor:  # y with the adapters added
    """``base()`` plus the batch's adapters (``apply_lora``'s sum).  On CUDA the shrink, which reads only x,
    runs on a side stream (``lora_stream``) while ``base`` runs on the current one, and the expand follows both:
    a decode batch's shrink is a few microseconds of small programs bound by latency, not bandwidth, so it fits
    beside the base GEMM instead of after it.  Graph-safe: the fork and join are stream waits, which a CUDA
    graph capture records as dependencies, and the scratch is allocated on the current stream before the fork."""
    if not segments.has_lora:
        return base()
    if not x.is_cuda:
        y = base()
        apply_lora(x, y, *weights, segments)
        return y
    from radixlm.kernels.lora_triton import lora_shrink_triton, shrink_split_k

    num_slices = weights.slice_offsets.shape[0] - 1
    num_segs = segments.seg_slots.shape[0]
    split_k = shrink_split_k(x, weights.a_pool, num_slices, num_segs, segments.max_seg_len)
    tmp = torch.empty(split_k, x.shape[0], weights.a_pool.shape[1], dtype=torch.float32, device=x.device)
    main, side = torch.cuda.current_stream(x.device), lora_stream(x.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        lora_shrink_triton(x, weights.a_pool, segments.seg_starts, segments.seg_slots, weights.ranks, num_slices,
                           segments.max_seg_len, token_order=segments.token_order, out=tmp)
    y = base()
    main.wait_stream(side)
    lora_expand(tmp[:1], weights.b_pool, segments.seg_starts, segments.seg_slots, weights.ranks, weights.scalings,
                weights.slice_offsets, y, segments.max_seg_len, segments.token_order)
    return y


@functools.cache
def lora_stream(device: torch.device) -> "torch.cuda.Stream":
    """The side stream of ``lora_forward``'s shrinks on ``device`` (one per device: its launches are ordered,
    which the shrink's shared split counters need)."""
    return torch.cuda.Stream(device)


def lora_shrink_ref(
    x: torch.Tensor, a_pool: torch.Tensor, seg_starts: torch.Tensor, seg_slots: torch.Tensor, ranks: torch.Tensor,
    num_slices: int, token_order: torch.Tensor | None = None,
) -> torch.Tensor:
    """``lora_shrink`` in torch, one matmul per segment and slice in float32 (reads the metadata on the host);
    rows of slot -1 (or rank 0) positions are 0."""
    max_rank = a_pool.shape[1] // num_slices
    tmp = torch.zeros(1, x.shape[0], num_slices * max_rank, dtype=torch.float32, device=x.device)
    starts, slots, rank_list = seg_starts.tolist(), seg_slots.tolist(), ranks.tolist()
    for i, slot in enumerate(slots):
        begin, end = starts[i], starts[i + 1]
        if slot < 0 or begin == end or rank_list[slot] == 0:
            continue
        rows = slice(begin, end) if token_order is None else token_order[begin:end].long()
        rank, xs = rank_list[slot], x[rows].float()
        for s in range(num_slices):
            a = a_pool[slot, s * max_rank:s * max_rank + rank].float()  # [rank, K]
            tmp[0, begin:end, s * max_rank:s * max_rank + rank] = xs @ a.T
    return tmp


def lora_expand_ref(
    tmp: torch.Tensor, b_pool: torch.Tensor, seg_starts: torch.Tensor, seg_slots: torch.Tensor, ranks: torch.Tensor,
    scalings: torch.Tensor, slice_offsets: torch.Tensor, y: torch.Tensor, token_order: torch.Tensor | None = None,
) -> None:
    """``lora_expand`` in torch: per segment and slice, ``y`` rows += scaling * product, in float32, rounded once
    to y's dtype (reads the metadata on the host)."""
    num_slices = slice_offsets.shape[0] - 1
    max_rank = tmp.shape[2] // num_slices
    total = tmp[0]
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
        rows = slice(begin, end) if token_order is None else token_order[begin:end].long()
        y[rows] = (y[rows].float() + scale_list[slot] * delta).to(y.dtype)
