"""The Triton path of ``radixlm.kernels.lora``: a segmented shrink and a segmented expand kernel (contracts,
layouts and numerics in that module's docstring).

Both launch a grid of (token tile of a segment, segment, slice or output tile): programs whose segment has no
adapter (slot -1, or a slot of rank 0 in this pool: its adapter leaves the projection alone) or whose tile starts
past the segment's end exit at once, so the grid is sized from host ints only (``cdiv(max_seg_len, BLOCK_M)``
tiles per segment) and the launch replays in a CUDA graph.  Each program
gathers its segment's adapter from the pool by slot and reads only the slot's first ``rank`` rows (A) or
columns (B): a rank-16 adapter in a rank-64 pool costs a quarter of the bytes.

- shrink: program (tile, segment, slice x K split) computes a partial ``[BLOCK_M, BLOCK_R]`` over its range of
  K, streaming x's rows and the slice's A rows once, into plane ``split`` of a ``[split_k, T, W]`` scratch.
  ``split_k`` (``default_split_k``) grows until the launch has about four programs per SM: a decode batch of
  a few adapters otherwise runs a few dozen programs, each streaming ``rank x K`` of A (14336 for Llama-8B's
  down projection) from one SM (GPU run L9: 47 of a layer's 83 us of LoRA kernels at batch 128).  Serial
  split-K: each program then bumps its tile's counter (``_split_counters``, one int32 per (tile, segment,
  slice), zero between launches); the one that brings it to ``split_k`` adds the planes in split order into
  plane 0 and zeroes the counter.  The result is deterministic and the expand reads one plane.
- expand: program (tile, segment, N tile) loads the B tile ``[BLOCK_N, rank]`` once, and for each slice whose
  columns meet the tile (one, unless a slice boundary falls inside it) multiplies that slice's ``tmp`` columns
  into the tile's fp32 accumulator; the epilogue adds ``scaling *`` it to y's tile and rounds once.

With ``token_order`` (a batch grouped by adapter without moving its tokens) a program gathers its x rows and
scatters into its y rows through it; ``tmp`` rows are positions in segment order either way.

Segments of one token (decode) use a GEMV form (``BLOCK_M`` 1: products and a reduction on the CUDA cores instead
of a ``tl.dot`` padded to 16 rows).

Launch parameters: from a sweep on an H200 at Llama-3.1-8B shapes (``bench/gpu/lora_tune.py``, docs/benchmarks.md
GPU runs L1/L2).  Tried and dropped: an expand program walking a chunk of N tiles was no faster in decode and
slower in prefill (run L2); decode without segments, every row's shrink by every slot in one cuBLAS GEMM and an
expand looping over the slots' rank chunks with each chunk's rows masked to its slot, was slower at 16 adapters
(runs L8/L9).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from radixlm.kernels.fused_ops import silu_mul
from radixlm.kernels.launch_tables import read_launch_table


@triton.jit
def _segment_tile(seg_starts_ptr, seg_slots_ptr, ranks_ptr, BLOCK_M: tl.constexpr):
    """Program (tile, segment, ...)'s rows and adapter: (slot, first row, the segment's end, rank); a segment of
    no adapter (slot -1) reads as slot 0 with rank 0, so rank 0 means "nothing to add" either way."""
    seg = tl.program_id(1)
    slot = tl.load(seg_slots_ptr + seg)
    m0 = tl.load(seg_starts_ptr + seg) + tl.program_id(0) * BLOCK_M
    end = tl.load(seg_starts_ptr + seg + 1)
    rank = tl.where(slot >= 0, tl.load(ranks_ptr + tl.maximum(slot, 0)), 0)
    return tl.maximum(slot, 0), m0, end, rank


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, tmp_ptr, seg_starts_ptr, seg_slots_ptr, ranks_ptr, order_ptr, counters_ptr,
    k_dim, max_rank, stride_xm, stride_as, stride_ar, stride_tk, stride_tm,
    DOT_PRECISION: tl.constexpr, GEMV: tl.constexpr, SPLIT_K: tl.constexpr, HAS_ORDER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    piece = tl.program_id(2) // SPLIT_K  # the slice
    split = tl.program_id(2) % SPLIT_K
    slot, m0, end, rank = _segment_tile(seg_starts_ptr, seg_slots_ptr, ranks_ptr, BLOCK_M)
    if (m0 >= end) | (rank == 0):  # no adapter, or the slot's adapter leaves this projection alone
        return
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < rank
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = slot.to(tl.int64) * stride_as + (piece * max_rank + offs_r).to(tl.int64) * stride_ar  # [BLOCK_R]
    out_cols = piece * max_rank + offs_r
    k_per_split = tl.cdiv(tl.cdiv(k_dim, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, k_dim)  # a split past K stores zeros
    if GEMV:
        x_row = x_ptr + (tl.load(order_ptr + m0) if HAS_ORDER else m0).to(tl.int64) * stride_xm
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k in range(k_start, k_end, BLOCK_K):
            k_ok = offs_k < k_end - k
            xv = tl.load(x_row + k + offs_k, mask=k_ok, other=0.0).to(tl.float32)  # [BLOCK_K]
            a = tl.load(a_ptr + a_rows[:, None] + k + offs_k[None, :], mask=r_ok[:, None] & k_ok[None, :],
                        other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_K]
            acc += tl.sum(a * xv[None, :], axis=1)
        out = tmp_ptr + m0.to(tl.int64) * stride_tm + out_cols  # [BLOCK_R]
        out_ok = offs_r < max_rank
    else:
        offs_m = m0 + tl.arange(0, BLOCK_M)  # positions; x's rows are tokens
        m_ok = offs_m < end
        x_rows = tl.load(order_ptr + offs_m, mask=m_ok, other=0) if HAS_ORDER else offs_m
        x_ptrs = x_ptr + x_rows.to(tl.int64)[:, None] * stride_xm + k_start + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
        a_ptrs = a_ptr + a_rows[None, :] + k_start + offs_k[:, None]  # [BLOCK_K, BLOCK_R]
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k in range(k_start, k_end, BLOCK_K):
            k_ok = offs_k < k_end - k
            xt = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            at = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            acc = tl.dot(xt, at, acc, input_precision=DOT_PRECISION)
            x_ptrs += BLOCK_K
            a_ptrs += BLOCK_K
        out = tmp_ptr + offs_m.to(tl.int64)[:, None] * stride_tm + out_cols[None, :]  # [BLOCK_M, BLOCK_R]
        out_ok = m_ok[:, None] & (offs_r < max_rank)[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc, mask=out_ok)
    else:
        # Serial split-K: each split stores its partial in its plane of tmp; the last of the tile's splits to
        # finish (a counter per tile, reset by that program for the next launch) adds them in split order,
        # reading past L1 (the planes were written by other SMs), into plane 0.
        tl.store(out + split * stride_tk, acc, mask=out_ok)
        tl.debug_barrier()  # every thread's partial is stored before the release below
        tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        counter = counters_ptr + tile * (tl.num_programs(2) // SPLIT_K) + piece
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1:
            total = tl.load(out, mask=out_ok, other=0.0, cache_modifier=".cg")
            for i in tl.static_range(1, SPLIT_K):
                total += tl.load(out + i * stride_tk, mask=out_ok, other=0.0, cache_modifier=".cg")
            tl.store(out, total, mask=out_ok)
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")


@triton.jit
def _lora_expand_kernel(
    tmp_ptr, b_ptr, y_ptr, out_ptr, seg_starts_ptr, seg_slots_ptr, ranks_ptr, scalings_ptr, offsets_ptr, order_ptr,
    n_total, max_rank, stride_tm, stride_ts, stride_bs, stride_bn, stride_ym, stride_om,
    NUM_SLICES: tl.constexpr, DOT_PRECISION: tl.constexpr, GEMV: tl.constexpr, HAS_ORDER: tl.constexpr,
    HALF_DOT: tl.constexpr, DENSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    N_TILES: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Program (tile, segment, column group): ``N_TILES`` column tiles of ``BLOCK_N``, one after another, their
    loads pipelined ``NUM_STAGES`` deep (the segment's prologue once for all of them).  GEMV: one row, the
    products summed on the CUDA cores; else ``BLOCK_M`` rows through ``tl.dot``."""
    slot, m0, end, rank = _segment_tile(seg_starts_ptr, seg_slots_ptr, ranks_ptr, BLOCK_M)
    if m0 >= end:
        return
    if not DENSE:  # only the adapters' rows (dense: every row is written, rows of rank 0 get a copy)
        if rank == 0:
            return
    scaling = tl.where(rank > 0, tl.load(scalings_ptr + slot), 0.0)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < rank
    b_slot = b_ptr + slot.to(tl.int64) * stride_bs + offs_r[:, None]
    # tmp: the shrink's rows are positions in segment order; the dense GEMM's are tokens, one column block per slot
    t_slot = tmp_ptr + slot.to(tl.int64) * stride_ts
    if GEMV:
        rows = (tl.load(order_ptr + m0) if HAS_ORDER else m0).to(tl.int64)
        t_ptrs = t_slot + (rows if DENSE else m0.to(tl.int64)) * stride_tm + offs_r  # [BLOCK_R]
        t_mask = r_ok
    else:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < end
        rows = (tl.load(order_ptr + offs_m, mask=m_ok, other=0) if HAS_ORDER else offs_m).to(tl.int64)
        t_ptrs = t_slot + (rows if DENSE else offs_m.to(tl.int64))[:, None] * stride_tm + offs_r[None, :]
        t_mask = m_ok[:, None] & r_ok[None, :]  # [BLOCK_M, BLOCK_R]
    for i in tl.range(0, N_TILES, num_stages=NUM_STAGES):
        n0 = (tl.program_id(2) * N_TILES + i) * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_total
        b = tl.load(b_slot + offs_n.to(tl.int64)[None, :] * stride_bn, mask=r_ok[:, None] & n_ok[None, :],
                    other=0.0)  # [BLOCK_R, BLOCK_N]
        if GEMV:
            mask = n_ok
            y_ptrs = y_ptr + rows * stride_ym + offs_n
            out_ptrs = out_ptr + rows * stride_om + offs_n
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        else:
            mask = m_ok[:, None] & n_ok[None, :]
            y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :]
            out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :]
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        y = tl.load(y_ptrs, mask=mask, other=0.0)
        for s in tl.static_range(NUM_SLICES):
            lo = tl.load(offsets_ptr + s)
            hi = tl.load(offsets_ptr + s + 1)
            if (lo < n0 + BLOCK_N) & (hi > n0):
                in_slice = (offs_n >= lo) & (offs_n < hi)
                t = tl.load(t_ptrs + s * max_rank, mask=t_mask, other=0.0)
                if GEMV:
                    acc += tl.where(in_slice, tl.sum(t.to(tl.float32)[:, None] * b.to(tl.float32), axis=0), 0.0)
                elif HALF_DOT:  # tmp rounded to the pool's dtype (GPU run L10: 20 % less expand time than tf32)
                    acc += tl.where(in_slice[None, :], tl.dot(t.to(b.dtype), b), 0.0)
                else:
                    acc += tl.where(in_slice[None, :], tl.dot(t.to(tl.float32), b.to(tl.float32),
                                                              input_precision=DOT_PRECISION), 0.0)
        tl.store(out_ptrs, (y.to(tl.float32) + scaling * acc).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lora_expand_silu_mul_kernel(
    tmp_ptr, b_ptr, y_ptr, out_ptr, seg_starts_ptr, seg_slots_ptr, ranks_ptr, scalings_ptr, order_ptr,
    inter, max_rank, stride_tm, stride_ts, stride_bs, stride_bn, stride_ym, stride_om,
    DOT_PRECISION: tl.constexpr, GEMV: tl.constexpr, HAS_ORDER: tl.constexpr, HALF_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, N_TILES: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """The dense expand of a gate_up projection (slices gate ‖ up, ``inter`` columns each) with the SiLU-mul as
    its epilogue: program (tile, segment, column group) adds its rows' adapter to ``N_TILES`` gate and up tiles
    of ``inter`` in fp32 and stores ``silu(gate) * up``, rounded once; every row is written (rows of no adapter:
    the plain activation)."""
    slot, m0, end, rank = _segment_tile(seg_starts_ptr, seg_slots_ptr, ranks_ptr, BLOCK_M)
    if m0 >= end:
        return
    scaling = tl.where(rank > 0, tl.load(scalings_ptr + slot), 0.0)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < rank
    b_rows = b_ptr + slot.to(tl.int64) * stride_bs + offs_r[:, None]
    t_slot = tmp_ptr + slot.to(tl.int64) * stride_ts
    if GEMV:
        rows = (tl.load(order_ptr + m0) if HAS_ORDER else m0).to(tl.int64)
        t_ptrs = t_slot + rows * stride_tm + offs_r  # [BLOCK_R]
        t_mask = r_ok
    else:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < end
        rows = (tl.load(order_ptr + offs_m, mask=m_ok, other=0) if HAS_ORDER else offs_m).to(tl.int64)
        t_ptrs = t_slot + rows[:, None] * stride_tm + offs_r[None, :]  # [BLOCK_M, BLOCK_R]
        t_mask = m_ok[:, None] & r_ok[None, :]
    t_gate = tl.load(t_ptrs, mask=t_mask, other=0.0)
    t_up = tl.load(t_ptrs + max_rank, mask=t_mask, other=0.0)
    for i in tl.range(0, N_TILES, num_stages=NUM_STAGES):
        offs_n = (tl.program_id(2) * N_TILES + i) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < inter
        b_mask = r_ok[:, None] & n_ok[None, :]
        b_gate = tl.load(b_rows + offs_n.to(tl.int64)[None, :] * stride_bn, mask=b_mask, other=0.0)
        b_up = tl.load(b_rows + (inter + offs_n).to(tl.int64)[None, :] * stride_bn, mask=b_mask, other=0.0)
        if GEMV:
            mask = n_ok
            y_ptrs = y_ptr + rows * stride_ym + offs_n
            out_ptrs = out_ptr + rows * stride_om + offs_n
        else:
            mask = m_ok[:, None] & n_ok[None, :]
            y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :]
            out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :]
        gate = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(y_ptrs + inter, mask=mask, other=0.0).to(tl.float32)
        if GEMV:
            gate += scaling * tl.sum(t_gate.to(tl.float32)[:, None] * b_gate.to(tl.float32), axis=0)
            up += scaling * tl.sum(t_up.to(tl.float32)[:, None] * b_up.to(tl.float32), axis=0)
        elif HALF_DOT:  # tmp in the pool's half precision, as the plain expand's dot form
            gate += scaling * tl.dot(t_gate.to(b_gate.dtype), b_gate)
            up += scaling * tl.dot(t_up.to(b_up.dtype), b_up)
        else:
            gate += scaling * tl.dot(t_gate.to(tl.float32), b_gate.to(tl.float32), input_precision=DOT_PRECISION)
            up += scaling * tl.dot(t_up.to(tl.float32), b_up.to(tl.float32), input_precision=DOT_PRECISION)
        tl.store(out_ptrs, silu_mul(gate, up).to(out_ptr.dtype.element_ty), mask=mask)


def _block_m(max_seg_len: int) -> int:
    """Rows per program: 1 (GEMV) for one-token segments, else the smallest ``tl.dot`` M covering the longest
    segment, up to 64."""
    if max_seg_len <= 1:
        return 1
    return min(64, max(16, triton.next_power_of_2(max_seg_len)))


def _block_r(max_rank: int) -> int:
    return max(16, triton.next_power_of_2(max_rank))


def _precision(dtype: torch.dtype) -> str:
    # float32 models get IEEE products (their tests compare at 1e-4); half-precision values are exact in tf32.
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_rows(t: torch.Tensor, name: str) -> None:
    if t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1):
        raise ValueError(f"{name} must be 2-D with a unit column stride, got shape {tuple(t.shape)} "
                         f"strides {t.stride()}")


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def default_split_k(programs: int, k_dim: int, num_sms: int) -> int:
    """K splits of the shrink: doubled while the launch has fewer than four programs per SM and each split keeps
    >= 256 of K, up to 32.  The splits are summed by the kernel itself (serial split-K), so the expand reads one
    plane whatever the count."""
    split = 1
    while split < 32 and programs * split < 4 * num_sms and k_dim // (2 * split) >= 256:
        split *= 2
    return split


SPLIT_COUNTERS = 1 << 16  # per device: the serial split-K's tile counters (zero between launches)


@functools.cache
def _split_counters(device: torch.device) -> torch.Tensor:
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("the LoRA shrink's split-K counters are allocated on its first launch, which must "
                           "precede any CUDA graph capture")
    return torch.zeros(SPLIT_COUNTERS, dtype=torch.int32, device=device)


class ExpandConfig(NamedTuple):
    """An expand launch: ``block_n`` columns a tile, ``n_tiles`` tiles a program (their loads pipelined
    ``num_stages`` deep), ``num_warps``."""

    block_n: int
    num_warps: int = 4
    n_tiles: int = 1
    num_stages: int = 1


def expand_config(block_m: int, num_slices: int, silu_mul: bool = False) -> ExpandConfig:
    """The expand's launch, from the sweeps at Llama-3.1-8B shapes: the GEMV form 64 columns and 4 warps (run
    L1); decode pieces (BLOCK_M 16) with the product in the pool's half precision 128 columns for merged
    projections (gate_up: 18.5 us against 23.2 for 256 columns; loads two stages deep, run N2) and 64 for
    single-slice ones (down: 8.8 against 9.8), 4 warps (run L10); gate_up's expand with the SiLU-mul two tiles
    of 128 a program, two stages (run N2: 16.3 us against 18.2 for one tile of 64; Llama-3.1-8B with 16
    adapters at batch 128 8.57 ms a step against 8.97); prefill tiles 128 columns and 4 warps for merged
    projections, 256 and 8 for single-slice ones (run L3)."""
    if block_m == 1:
        return ExpandConfig(64, 4)
    if block_m <= 16:
        if silu_mul:
            return ExpandConfig(128, 4, n_tiles=2, num_stages=2)
        return ExpandConfig(128, 4, num_stages=2) if num_slices > 1 else ExpandConfig(64, 4)
    return ExpandConfig(128, 4) if num_slices > 1 else ExpandConfig(256, 8)


@functools.cache
def expand_config_overrides() -> dict[tuple[str, int, int], ExpandConfig]:
    """Decode expands' launches from the JSON file named by ``RADIXLM_LORA_EXPAND_CONFIGS`` (``{"KIND,N,BLOCK_M":
    [block_n, num_warps, n_tiles, num_stages]}``, KIND ``dense`` or ``silu``, N the output columns, as
    ``bench/gpu/lora_tune.py --dense --write-configs`` writes them), read once."""
    return {(kind, int(n), int(block_m)): ExpandConfig(*values)
            for (kind, n, block_m), values in read_launch_table("RADIXLM_LORA_EXPAND_CONFIGS").items()}


def _expand_launch(kind: str, n: int, block_m: int, num_slices: int, block_n: int | None, num_warps: int | None,
                   n_tiles: int | None, num_stages: int | None) -> ExpandConfig:
    """The expand's launch: explicit arguments over ``RADIXLM_LORA_EXPAND_CONFIGS``'s over ``expand_config``."""
    base = expand_config_overrides().get((kind, n, block_m)) or expand_config(block_m, num_slices, kind == "silu")
    return ExpandConfig(block_n or base.block_n, num_warps or base.num_warps, n_tiles or base.n_tiles,
                        num_stages or base.num_stages)


def lora_shrink_triton(
    x: torch.Tensor, a_pool: torch.Tensor, seg_starts: torch.Tensor, seg_slots: torch.Tensor, ranks: torch.Tensor,
    num_slices: int, max_seg_len: int | None = None, split_k: int | None = None,
    token_order: torch.Tensor | None = None, block_k: int | None = None, num_warps: int | None = None,
) -> torch.Tensor:
    """``radixlm.kernels.lora.lora_shrink`` in one launch (CUDA, or CPU tensors under the interpreter);
    ``split_k`` defaults to ``default_split_k``'s, ``block_k`` to 128 for the GEMV form and 64 for the dot form,
    ``num_warps`` to 8 and 4 (the overrides are for tuning: bench/gpu/lora_tune.py).  Launches on one stream
    at a time per device (they share the split counters)."""
    _check_rows(x, "x")
    num_tokens, k_dim = x.shape
    max_rank = a_pool.shape[1] // num_slices
    num_segs = seg_slots.shape[0]
    block_m = _block_m(num_tokens if max_seg_len is None else max_seg_len)
    tiles = triton.cdiv(num_tokens if max_seg_len is None else max_seg_len, block_m)
    if split_k is None:
        split_k = default_split_k(tiles * num_segs * num_slices, k_dim, _num_sms(x.device))
    if tiles * num_segs * num_slices > SPLIT_COUNTERS:
        split_k = 1
    tmp = torch.empty(split_k, num_tokens, num_slices * max_rank, dtype=torch.float32, device=x.device)
    if num_tokens == 0 or num_segs == 0:
        return tmp[:1]
    _lora_shrink_kernel[(tiles, num_segs, num_slices * split_k)](
        x, a_pool, tmp, seg_starts, seg_slots, ranks, seg_starts if token_order is None else token_order,
        _split_counters(x.device),
        k_dim, max_rank, x.stride(0), a_pool.stride(0), a_pool.stride(1), tmp.stride(0), tmp.stride(1),
        DOT_PRECISION=_precision(x.dtype), GEMV=block_m == 1, SPLIT_K=split_k, HAS_ORDER=token_order is not None,
        BLOCK_M=block_m, BLOCK_R=_block_r(max_rank), BLOCK_K=block_k or (128 if block_m == 1 else 64),
        num_warps=num_warps or (8 if block_m == 1 else 4),
    )
    return tmp[:1]  # plane 0 holds the sum of the splits


def lora_expand_triton(
    tmp: torch.Tensor, b_pool: torch.Tensor, seg_starts: torch.Tensor, seg_slots: torch.Tensor, ranks: torch.Tensor,
    scalings: torch.Tensor, slice_offsets: torch.Tensor, y: torch.Tensor, max_seg_len: int | None = None,
    token_order: torch.Tensor | None = None, block_n: int | None = None, num_warps: int | None = None,
    n_tiles: int | None = None, num_stages: int | None = None,
) -> None:
    """``radixlm.kernels.lora.lora_expand`` in one launch (CUDA, or CPU tensors under the interpreter); the
    launch parameters default to ``expand_config``'s (overrides: as the shrink's)."""
    _check_rows(y, "y")
    if tmp.shape[0] != 1:
        raise ValueError(f"the expand takes the shrink's single plane [1, T, W], got {tuple(tmp.shape)}")
    num_tokens, n_total = y.shape
    num_slices = slice_offsets.shape[0] - 1
    max_rank = b_pool.shape[2]
    num_segs = seg_slots.shape[0]
    if num_tokens == 0 or num_segs == 0:
        return
    block_m = _block_m(num_tokens if max_seg_len is None else max_seg_len)
    cfg = _expand_launch("segmented", n_total, block_m, num_slices, block_n, num_warps, n_tiles, num_stages)
    grid = (triton.cdiv(num_tokens if max_seg_len is None else max_seg_len, block_m), num_segs,
            triton.cdiv(n_total, cfg.block_n * cfg.n_tiles))
    _lora_expand_kernel[grid](
        tmp, b_pool, y, y, seg_starts, seg_slots, ranks, scalings, slice_offsets,
        seg_starts if token_order is None else token_order, n_total, max_rank, tmp.stride(1), 0, b_pool.stride(0),
        b_pool.stride(1), y.stride(0), y.stride(0),
        NUM_SLICES=num_slices, DOT_PRECISION=_precision(b_pool.dtype), GEMV=block_m == 1,
        HAS_ORDER=token_order is not None, HALF_DOT=b_pool.dtype != torch.float32, DENSE=False,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_R=_block_r(max_rank), N_TILES=cfg.n_tiles,
        NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps,
    )


def lora_expand_dense_triton(
    y_ext: torch.Tensor, out: torch.Tensor, b_pool: torch.Tensor, seg_starts: torch.Tensor, seg_slots: torch.Tensor,
    ranks: torch.Tensor, scalings: torch.Tensor, slice_offsets: torch.Tensor, max_seg_len: int,
    token_order: torch.Tensor | None = None, block_n: int | None = None, num_warps: int | None = None,
    n_tiles: int | None = None, num_stages: int | None = None,
) -> None:
    """``radixlm.kernels.lora.lora_expand_dense`` in one launch: the expand kernel reading ``tmp`` from the dense
    GEMM's tail columns (token rows, one block of columns per slot) and writing every row of ``out``; launch
    parameters as ``lora_expand_triton``'s."""
    _check_rows(y_ext, "y_ext")
    _check_rows(out, "out")
    num_tokens, n_total = out.shape
    num_slices = slice_offsets.shape[0] - 1
    max_rank = b_pool.shape[2]
    num_segs = seg_slots.shape[0]
    if num_tokens == 0 or num_segs == 0:
        return
    block_m = _block_m(max_seg_len)
    cfg = _expand_launch("dense", n_total, block_m, num_slices, block_n, num_warps, n_tiles, num_stages)
    grid = (triton.cdiv(max_seg_len, block_m), num_segs, triton.cdiv(n_total, cfg.block_n * cfg.n_tiles))
    _lora_expand_kernel[grid](
        y_ext[:, n_total:], b_pool, y_ext, out, seg_starts, seg_slots, ranks, scalings, slice_offsets,
        seg_starts if token_order is None else token_order, n_total, max_rank, y_ext.stride(0),
        num_slices * max_rank, b_pool.stride(0), b_pool.stride(1), y_ext.stride(0), out.stride(0),
        NUM_SLICES=num_slices, DOT_PRECISION=_precision(b_pool.dtype), GEMV=block_m == 1,
        HAS_ORDER=token_order is not None, HALF_DOT=b_pool.dtype != torch.float32, DENSE=True,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_R=_block_r(max_rank), N_TILES=cfg.n_tiles,
        NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps,
    )


def lora_expand_dense_silu_mul_triton(
    y_ext: torch.Tensor, out: torch.Tensor, b_pool: torch.Tensor, seg_starts: torch.Tensor, seg_slots: torch.Tensor,
    ranks: torch.Tensor, scalings: torch.Tensor, max_seg_len: int, token_order: torch.Tensor | None = None,
    block_n: int | None = None, num_warps: int | None = None, n_tiles: int | None = None,
    num_stages: int | None = None,
) -> None:
    """``radixlm.kernels.lora.lora_expand_dense_silu_mul`` in one launch (``_lora_expand_silu_mul_kernel``);
    ``block_n`` defaults to a single-slice expand's (each program reads a gate and an up tile)."""
    _check_rows(y_ext, "y_ext")
    _check_rows(out, "out")
    num_tokens, inter = out.shape
    max_rank = b_pool.shape[2]
    num_segs = seg_slots.shape[0]
    if num_tokens == 0 or num_segs == 0:
        return
    block_m = _block_m(max_seg_len)
    cfg = _expand_launch("silu", inter, block_m, 1, block_n, num_warps, n_tiles, num_stages)
    grid = (triton.cdiv(max_seg_len, block_m), num_segs, triton.cdiv(inter, cfg.block_n * cfg.n_tiles))
    _lora_expand_silu_mul_kernel[grid](
        y_ext[:, 2 * inter:], b_pool, y_ext, out, seg_starts, seg_slots, ranks, scalings,
        seg_starts if token_order is None else token_order, inter, max_rank, y_ext.stride(0), 2 * max_rank,
        b_pool.stride(0), b_pool.stride(1), y_ext.stride(0), out.stride(0),
        DOT_PRECISION=_precision(b_pool.dtype), GEMV=block_m == 1, HAS_ORDER=token_order is not None,
        HALF_DOT=b_pool.dtype != torch.float32, BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_R=_block_r(max_rank),
        N_TILES=cfg.n_tiles, NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps,
    )
