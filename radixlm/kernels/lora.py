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

Graph safety: nothing here reads a device value on the host or allocates besides the functions' outputs.  The
launch grid depends only on host ints: the number of tokens, of segments, and ``max_seg_len``, an upper bound on
the adapter segments' lengths (``LoraSegments.max_seg_len``; default: the number of tokens, always valid; slot -1
segments do no work, so their length is free).  A CUDA graph
captures one layout size (the token count, the segment count, ``max_seg_len``) and replays with new metadata
copied into the same tensors: decode with one segment per request (``merge=False``: ``max_seg_len`` 1, the
GEMV form), or requests sorted by adapter, merged, cut into pieces of ``split`` tokens and padded to
``build_segments``' segment bound (``max_seg_len`` = split, the dot form: fewer programs, each B tile read once
per piece instead of once per request).

Dense decode (``lora_forward`` with a ``dense`` layout, on a pool whose A rows are stored below the base weight,
``LoraWeights.weight_ext``): one GEMM ``x @ [W; A_all]^T`` gives the base output and every row's shrink by every
slot (``tmp`` columns ``[slot * S * R, (slot + 1) * S * R)`` of the result's tail); the expand reads a row's own
slot's columns and writes base + delta out of place (``lora_expand_dense``), so a decode layer launches no shrink.
The extra rows cost their bytes inside a GEMM that streams the weight anyway (GPU run M3, Llama-3.1-8B layer, 128
rows, 16 rank-16 adapters: +7 us, against ~30 us for four shrink launches); ``tmp`` is then the GEMM's output,
rounded to the model dtype like a half-precision PEFT model's.  The decode layouts cover every row (slot -1 rows
are copied), which the out-of-place expand needs.  A gate_up projection's expand can end in the SiLU-mul
(``lora_silu_mul_forward``: the MLP's activation, so the projection's output is read once instead of written,
read back and read again).

Base-only fast path: ``LoraSegments.has_lora`` is a host bool (from the host slot list); ``apply_lora`` returns
at once when it is false, so a batch without adapters launches nothing.  A captured graph must not take that
path when a replay may carry adapters.

CUDA tensors run the Triton kernels (``radixlm.kernels.lora_triton``, imported on first CUDA call); others run
``lora_shrink_ref`` / ``lora_expand_ref`` (loops over segments in torch), the definitions the kernels are tested
against and the CPU path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F


class LoraWeights(NamedTuple):
    """One projection's adapter pool (module docstring), in ``apply_lora``'s argument order."""

    a_pool: torch.Tensor  # [num_slots, num_slices * max_rank, K]
    b_pool: torch.Tensor  # [num_slots, N_total, max_rank]
    ranks: torch.Tensor  # [num_slots] int32
    scalings: torch.Tensor  # [num_slots] float32
    slice_offsets: torch.Tensor  # [num_slices + 1] int32
    # dense decode: [N_total + num_slots * num_slices * max_rank, K], the base weight's rows then a_pool's (a_pool
    # is a view of the tail); None: the pool stands alone (the base GEMM cannot compute the shrink)
    weight_ext: torch.Tensor | None = None
    bias_ext: torch.Tensor | None = None  # [N_total + ...]: the base bias then zeros, when the layer has one


class LoraSegments(NamedTuple):
    """One batch's adapter layout (module docstring)."""

    seg_starts: torch.Tensor  # [num_segs + 1] int32, offsets in segment order, non-decreasing, seg_starts[0] == 0
    seg_slots: torch.Tensor  # [num_segs] int32, pool slot or -1 (no adapter)
    max_seg_len: int  # host bound on every adapter (slot >= 0) segment's length, >= 1: the kernels' grid
    has_lora: bool  # host: some segment has a slot >= 0 (segments built here have tokens)
    # [T] int32: position k in segment order is token token_order[k] of x and y (a batch grouped by adapter
    # without moving its tokens); None: the identity
    token_order: torch.Tensor | None = None
    # every row lies in a segment of at most max_seg_len (slot -1 rows included): the layout the dense decode's
    # out-of-place expand needs (``decode_segments(dense=True)``)
    dense: bool = False


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
    split_base: bool = False,
) -> LoraSegments:
    """Segments over requests in batch order (requests without tokens make no segment), or with ``sort`` in the
    order of their slots (stable; ``token_order`` then maps segment order to the batch's tokens, which do not
    move: one segment per adapter instead of one per run of it).  ``merge``: consecutive requests of one
    slot share a segment; else one segment per request.  ``split``: cut adapter segments into pieces of at most
    ``split`` tokens, so the grid holds one token tile per segment instead of the segment count times the longest
    segment's tiles; slot -1 ones need no work and stay whole, unless ``split_base`` (the dense decode's expand
    copies their rows, so its grid must cover them).  ``num_segs``: pad with empty slot -1
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
        whole = split is None or n <= split or (slot < 0 and not split_base)
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
                    rows: int | None = None, dense: bool = False) -> LoraSegments:
    """Decode's ``LoraSegments`` for one-token rows of ``slots`` (pool slot or -1), in ``decode_layout``'s
    fixed shape for ``rows`` rows (default: ``len(slots)``; more pads with rows of no adapter: a CUDA graph's
    batch size), so that every batch of ``rows`` rows has the same tensor shapes and ``max_seg_len``.  Every
    row lies in a segment of at most ``max_seg_len`` rows; ``dense`` marks the layout for the dense decode."""
    rows = len(slots) if rows is None else rows
    if rows < len(slots):
        raise ValueError(f"{len(slots)} decode rows do not fit a layout of {rows}")
    padded = list(slots) + [-1] * (rows - len(slots))
    split, num_segs = decode_layout(rows, num_slots)
    if split is None:
        seg = build_segments(padded, [1] * rows, device, merge=False)
        return seg._replace(max_seg_len=1, dense=dense)
    seg = build_segments(padded, [1] * rows, device, sort=True, split=split, num_segs=num_segs, num_order=rows,
                         split_base=True)
    return seg._replace(max_seg_len=split, dense=dense)


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
    base: Callable[[], torch.Tensor],  # the base projection of x: y [T, N_total], a fresh tensor
    weights: LoraWeights,
    segments: LoraSegments,
    bias_in_matmul: bool = True,
) -> torch.Tensor:  # [T, N_total], contiguous
    """The projection's output with the batch's adapters added: ``base()`` untouched when no row has an adapter;
    with a ``dense`` layout on a pool that has ``weight_ext``, one GEMM and the out-of-place expand (module
    docstring; ``bias_in_matmul``: the GEMM adds ``bias_ext``, as a column-parallel layer adds its bias; a
    row-parallel one adds it after its all-reduce); else ``base()`` then ``apply_lora``."""
    if not segments.has_lora:
        return base()
    if segments.dense and weights.weight_ext is not None:
        y_ext = F.linear(x, weights.weight_ext, weights.bias_ext if bias_in_matmul else None)
        out = torch.empty(x.shape[0], weights.b_pool.shape[1], dtype=y_ext.dtype, device=y_ext.device)
        lora_expand_dense(y_ext, out, weights.b_pool, segments.seg_starts, segments.seg_slots, weights.ranks,
                          weights.scalings, weights.slice_offsets, segments.max_seg_len, segments.token_order)
        return out
    y = base()
    apply_lora(x, y, weights.a_pool, weights.b_pool, weights.ranks, weights.scalings, weights.slice_offsets,
               segments)
    return y


def lora_silu_mul_forward(x: torch.Tensor, weights: LoraWeights, segments: LoraSegments) -> torch.Tensor:
    """``silu(gate) * up`` [T, inter] of a merged gate_up projection (two slices of ``inter`` columns) with the
    batch's adapters added, for a ``dense`` layout on a pool with ``weight_ext``: the dense GEMM, then the expand
    with the activation as its epilogue (``lora_expand_dense_silu_mul``), so the projection's output never makes
    the round trip through memory that the expand and then the activation kernel would give it."""
    y_ext = F.linear(x, weights.weight_ext, weights.bias_ext)
    out = torch.empty(x.shape[0], weights.b_pool.shape[1] // 2, dtype=y_ext.dtype, device=y_ext.device)
    lora_expand_dense_silu_mul(y_ext, out, weights.b_pool, segments.seg_starts, segments.seg_slots, weights.ranks,
                               weights.scalings, segments.max_seg_len, segments.token_order)
    return out


def lora_expand_dense_silu_mul(
    y_ext: torch.Tensor,  # [T, 2 * inter + num_slots * 2 * max_rank]: x @ [W_gate; W_up; A_all]^T
    out: torch.Tensor,  # [T, inter], written
    b_pool: torch.Tensor,  # [num_slots, 2 * inter, max_rank]
    seg_starts: torch.Tensor,
    seg_slots: torch.Tensor,
    ranks: torch.Tensor,
    scalings: torch.Tensor,
    max_seg_len: int,
    token_order: torch.Tensor | None = None,
) -> None:
    """``out[t] = silu(g) * u`` with ``g ‖ u = y_ext[t, :2 inter] + scaling * (row t's slot's shrink) @ B^T`` per
    slice, in fp32, rounded once (``lora_expand_dense`` without the rounding of g and u, then the SiLU-mul)."""
    num_slots, n_total, max_rank = b_pool.shape
    if n_total % 2 or y_ext.shape[1] != n_total + num_slots * 2 * max_rank or out.shape != (y_ext.shape[0],
                                                                                             n_total // 2):
        raise ValueError(f"the dense GEMM's output {tuple(y_ext.shape)} and the activation's {tuple(out.shape)} do "
                         f"not match a gate_up pool of {num_slots} slots over {n_total} outputs")
    if out.is_cuda:
        from radixlm.kernels.lora_triton import lora_expand_dense_silu_mul_triton

        lora_expand_dense_silu_mul_triton(y_ext, out, b_pool, seg_starts, seg_slots, ranks, scalings, max_seg_len,
                                          token_order)
        return
    full = torch.empty(y_ext.shape[0], n_total, dtype=torch.float32, device=y_ext.device)
    offsets = torch.tensor([0, n_total // 2, n_total], dtype=torch.int32)
    lora_expand_dense_ref(y_ext.float(), full, b_pool, seg_starts, seg_slots, ranks, scalings, offsets, token_order)
    gate, up = full.chunk(2, dim=1)
    out.copy_(F.silu(gate) * up)


def lora_expand_dense(
    y_ext: torch.Tensor,  # [T, N_total + num_slots * num_slices * max_rank]: x @ [W; A_all]^T
    out: torch.Tensor,  # [T, N_total], written
    b_pool: torch.Tensor,  # [num_slots, N_total, max_rank]
    seg_starts: torch.Tensor,
    seg_slots: torch.Tensor,
    ranks: torch.Tensor,
    scalings: torch.Tensor,
    slice_offsets: torch.Tensor,
    max_seg_len: int,  # bounds every segment, slot -1 ones included
    token_order: torch.Tensor | None = None,
) -> None:
    """``out[t] = y_ext[t, :N] + scaling * T_t[s*R : s*R + rank] @ B_slot^T`` per slice, with ``T_t`` the columns
    of row t's slot in ``y_ext``'s tail, for every row t (rows of slot -1 or rank 0 copied): the expand of the
    dense decode.  Every row must lie in a segment (``LoraSegments.dense``)."""
    num_slots, n_total, max_rank = b_pool.shape
    width = (slice_offsets.shape[0] - 1) * max_rank
    if y_ext.shape[1] != n_total + num_slots * width or out.shape != (y_ext.shape[0], n_total):
        raise ValueError(f"the dense GEMM's output {tuple(y_ext.shape)} and the expand's {tuple(out.shape)} do not "
                         f"match a pool of {num_slots} slots of {width} columns over {n_total} outputs")
    if out.is_cuda:
        from radixlm.kernels.lora_triton import lora_expand_dense_triton

        lora_expand_dense_triton(y_ext, out, b_pool, seg_starts, seg_slots, ranks, scalings, slice_offsets,
                                 max_seg_len, token_order)
        return
    lora_expand_dense_ref(y_ext, out, b_pool, seg_starts, seg_slots, ranks, scalings, slice_offsets, token_order)


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


def lora_expand_dense_ref(
    y_ext: torch.Tensor, out: torch.Tensor, b_pool: torch.Tensor, seg_starts: torch.Tensor, seg_slots: torch.Tensor,
    ranks: torch.Tensor, scalings: torch.Tensor, slice_offsets: torch.Tensor, token_order: torch.Tensor | None = None,
) -> None:
    """``lora_expand_dense`` in torch: the base columns copied, then ``lora_expand_ref`` over each adapter
    position's slot columns of the GEMM's tail, gathered into a position-ordered ``tmp`` (reads the metadata on
    the host)."""
    n_total, max_rank = b_pool.shape[1], b_pool.shape[2]
    width = (slice_offsets.shape[0] - 1) * max_rank
    out.copy_(y_ext[:, :n_total])
    tmp = torch.zeros(1, y_ext.shape[0], width, dtype=torch.float32, device=out.device)
    starts = seg_starts.tolist()
    for i, slot in enumerate(seg_slots.tolist()):
        begin, end = starts[i], starts[i + 1]
        if slot >= 0 and end > begin:
            rows = slice(begin, end) if token_order is None else token_order[begin:end].long()
            tmp[0, begin:end] = y_ext[rows, n_total + slot * width:n_total + (slot + 1) * width].float()
    lora_expand_ref(tmp, b_pool, seg_starts, seg_slots, ranks, scalings, slice_offsets, out, token_order)
