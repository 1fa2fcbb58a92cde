"""The Triton path of ``radixlm.kernels.lora``: a segmented shrink and a segmented expand kernel (contracts,
layouts and numerics in that module's docstring).

Both launch a grid of (token tile of a segment, segment, slice or output tile): programs whose segment has no
adapter (slot -1, or a slot of rank 0 in this pool: its adapter leaves the projection alone) or whose tile starts
past the segment's end exit at once, so the grid is sized from host ints only (``cdiv(max_seg_len, BLOCK_M)``
tiles per segment) and the launch replays in a CUDA graph.  Each program
gathers its segment's adapter from the pool by slot and reads only the slot's first ``rank`` rows (A) or
columns (B): a rank-16 adapter in a rank-64 pool costs a quarter of the bytes.

- shrink: program (tile, segment, slice x K split) computes ``tmp[split, tile, slice]`` ([BLOCK_M, BLOCK_R])
  over its range of K, streaming x's rows and the slice's A rows once.  ``split_k`` (``default_split_k``) grows
  until the launch has about four programs per SM (capped where the expand would re-read too many partials): a
  decode batch of a few adapters otherwise runs a few dozen programs, each streaming ``rank x K`` of A (14336 for
  Llama-8B's down projection) from one SM.
- expand: program (tile, segment, N tile) loads the B tile ``[BLOCK_N, rank]`` once, and for each slice whose
  columns meet the tile (one, unless a slice boundary falls inside it) sums that slice's ``tmp`` columns over
  the splits (in order: deterministic) and multiplies them into the tile's fp32 accumulator; the epilogue adds
  ``scaling *`` it to y's tile and rounds once.

With ``token_order`` (a batch grouped by adapter without moving its tokens) a program gathers its x rows and
scatters into its y rows through it; ``tmp`` rows are positions in segment order either way.

Segments of one token (decode) use a GEMV form (``BLOCK_M`` 1: products and a reduction on the CUDA cores instead
of a ``tl.dot`` padded to 16 rows).

Launch parameters: from a sweep on an H200 at Llama-3.1-8B shapes (``bench/gpu/lora_tune.py``, docs/benchmarks.md
GPU runs L1/L2).  Tried and dropped: an expand program walking a chunk of N tiles (its split-K partials read once
instead of per tile) was no faster in decode and slower in prefill (run L2).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, tmp_ptr, seg_starts_ptr, seg_slots_ptr, ranks_ptr, order_ptr,
    k_dim, max_rank, stride_xm, stride_as, stride_ar, stride_tk, stride_tm,
    DOT_PRECISION: tl.constexpr, GEMV: tl.constexpr, SPLIT_K: tl.constexpr, HAS_ORDER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    seg = tl.program_id(1)
    piece = tl.program_id(2) // SPLIT_K  # the slice
    split = tl.program_id(2) % SPLIT_K
    slot = tl.load(seg_slots_ptr + seg)
    m0 = tl.load(seg_starts_ptr + seg) + pid_m * BLOCK_M
    end = tl.load(seg_starts_ptr + seg + 1)
    if (slot < 0) | (m0 >= end):
        return
    rank = tl.load(ranks_ptr + slot)
    if rank == 0:  # the slot's adapter leaves this projection alone
        return
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < rank
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = slot.to(tl.int64) * stride_as + (piece * max_rank + offs_r).to(tl.int64) * stride_ar  # [BLOCK_R]
    out_cols = piece * max_rank + offs_r
    k_per_split = tl.cdiv(tl.cdiv(k_dim, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, k_dim)  # a split past K stores zeros: the expand adds every split
    tmp_ptr += split * stride_tk
    if GEMV:
        x_row = x_ptr + (tl.load(order_ptr + m0) if HAS_ORDER else m0).to(tl.int64) * stride_xm
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k in range(k_start, k_end, BLOCK_K):
            k_ok = offs_k < k_end - k
            xv = tl.load(x_row + k + offs_k, mask=k_ok, other=0.0).to(tl.float32)  # [BLOCK_K]
            a = tl.load(a_ptr + a_rows[:, None] + k + offs_k[None, :], mask=r_ok[:, None] & k_ok[None, :],
                        other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_K]
            acc += tl.sum(a * xv[None, :], axis=1)
        tl.store(tmp_ptr + m0.to(tl.int64) * stride_tm + out_cols, acc, mask=offs_r < max_rank)
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
        tl.store(tmp_ptr + offs_m.to(tl.int64)[:, None] * stride_tm + out_cols[None, :], acc,
                 mask=m_ok[:, None] & (offs_r < max_rank)[None, :])


@triton.jit
def _lora_expand_kernel(
    tmp_ptr, b_ptr, y_ptr, seg_starts_ptr, seg_slots_ptr, ranks_ptr, scalings_ptr, offsets_ptr, order_ptr,
    n_total, max_rank, split_k, stride_tk, stride_tm, stride_bs, stride_bn, stride_ym,
    NUM_SLICES: tl.constexpr, DOT_PRECISION: tl.constexpr, GEMV: tl.constexpr, HAS_ORDER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    seg = tl.program_id(1)
    pid_n = tl.program_id(2)
    slot = tl.load(seg_slots_ptr + seg)
    m0 = tl.load(seg_starts_ptr + seg) + pid_m * BLOCK_M
    end = tl.load(seg_starts_ptr + seg + 1)
    if (slot < 0) | (m0 >= end):
        return
    rank = tl.load(ranks_ptr + slot)
    if rank == 0:  # the slot's adapter leaves this projection alone
        return
    scaling = tl.load(scalings_ptr + slot)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_total
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < rank
    b = tl.load(b_ptr + slot.to(tl.int64) * stride_bs + offs_n.to(tl.int64)[None, :] * stride_bn + offs_r[:, None],
                mask=r_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_N]
    if GEMV:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        t_row = tmp_ptr + m0.to(tl.int64) * stride_tm
        for s in tl.static_range(NUM_SLICES):
            lo = tl.load(offsets_ptr + s)
            hi = tl.load(offsets_ptr + s + 1)
            if (lo < n0 + BLOCK_N) & (hi > n0):
                t = tl.zeros((BLOCK_R,), dtype=tl.float32)
                for i in range(split_k):  # in split order
                    t += tl.load(t_row + i * stride_tk + s * max_rank + offs_r, mask=r_ok, other=0.0)
                part = tl.sum(t[:, None] * b, axis=0)
                acc += tl.where((offs_n >= lo) & (offs_n < hi), part, 0.0)
        y_ptrs = y_ptr + (tl.load(order_ptr + m0) if HAS_ORDER else m0).to(tl.int64) * stride_ym + offs_n
        y = tl.load(y_ptrs, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (y + scaling * acc).to(y_ptr.dtype.element_ty), mask=n_ok)
    else:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < end
        rows = offs_m.to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for s in tl.static_range(NUM_SLICES):
            lo = tl.load(offsets_ptr + s)
            hi = tl.load(offsets_ptr + s + 1)
            if (lo < n0 + BLOCK_N) & (hi > n0):
                t_ptrs = tmp_ptr + rows[:, None] * stride_tm + s * max_rank + offs_r[None, :]
                t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                for i in range(split_k):  # in split order
                    t += tl.load(t_ptrs + i * stride_tk, mask=m_ok[:, None] & r_ok[None, :], other=0.0)
                part = tl.dot(t, b, input_precision=DOT_PRECISION)
                acc += tl.where(((offs_n >= lo) & (offs_n < hi))[None, :], part, 0.0)
        y_rows = (tl.load(order_ptr + offs_m, mask=m_ok, other=0) if HAS_ORDER else offs_m).to(tl.int64)
        y_ptrs = y_ptr + y_rows[:, None] * stride_ym + offs_n[None, :]
        mask = m_ok[:, None] & n_ok[None, :]
        y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (y + scaling * acc).to(y_ptr.dtype.element_ty), mask=mask)


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


def default_split_k(programs: int, k_dim: int, num_sms: int, block_m: int = 1, n_total: int | None = None) -> int:
    """K splits of the shrink: doubled while the launch has fewer than four programs per SM and each split keeps
    >= 256 of K, up to a cap.  Every expand program re-reads its rows' partials, so the cap falls as the expand's
    output widens relative to K: 16 for one-token rows (GEMV), else the power of two at or below
    ``c * K / n_total`` with c = 8 for decode pieces (``block_m`` <= 16) and 2 for prefill tiles (GPU run L3's joint
    sweep at Llama-3.1-8B shapes: qkv 4-8 / 1, gate_up 2-4 / 1, o 8 / 2, down 8-16 / 4)."""
    cap = 16
    if block_m > 1 and n_total:
        cap = max(1, min(16, 1 << max(0, ((8 if block_m <= 16 else 2) * k_dim // n_total).bit_length() - 1)))
    split = 1
    while split < cap and programs * split < 4 * num_sms and k_dim // (2 * split) >= 256:
        split *= 2
    return split


def expand_config(block_m: int, num_slices: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) of the expand, from GPU runs L1/L2's sweep at Llama-3.1-8B shapes: the GEMV form 64
    columns and 4 warps; the dot form 256 columns for decode pieces (BLOCK_M 16) and single-slice projections
    (o, down), 128 for merged prefill tiles, with 8 warps on single-slice projections."""
    if block_m == 1:
        return 64, 4
    return (256 if block_m <= 16 or num_slices == 1 else 128), (8 if num_slices == 1 else 4)


def lora_shrink_triton(
    x: torch.Tensor, a_pool: torch.Tensor, seg_starts: torch.Tensor, seg_slots: torch.Tensor, ranks: torch.Tensor,
    num_slices: int, max_seg_len: int | None = None, split_k: int | None = None,
    token_order: torch.Tensor | None = None, block_k: int | None = None, num_warps: int | None = None,
    n_total: int | None = None,
) -> torch.Tensor:
    """``radixlm.kernels.lora.lora_shrink`` in one launch (CUDA, or CPU tensors under the interpreter);
    ``split_k`` defaults to ``default_split_k``'s (``n_total``: the expand's output width, which caps it),
    ``block_k`` to 128 for the GEMV form and 64 for the dot form, ``num_warps`` to 8 and 4 (the overrides are for
    tuning: bench/gpu/lora_tune.py)."""
    _check_rows(x, "x")
    num_tokens, k_dim = x.shape
    max_rank = a_pool.shape[1] // num_slices
    num_segs = seg_slots.shape[0]
    block_m = _block_m(num_tokens if max_seg_len is None else max_seg_len)
    tiles = triton.cdiv(num_tokens if max_seg_len is None else max_seg_len, block_m)
    if split_k is None:
        split_k = default_split_k(tiles * num_segs * num_slices, k_dim, _num_sms(x.device), block_m, n_total)
    tmp = torch.empty(split_k, num_tokens, num_slices * max_rank, dtype=torch.float32, device=x.device)
    if num_tokens == 0 or num_segs == 0:
        return tmp
    _lora_shrink_kernel[(tiles, num_segs, num_slices * split_k)](
        x, a_pool, tmp, seg_starts, seg_slots, ranks, seg_starts if token_order is None else token_order,
        k_dim, max_rank, x.stride(0), a_pool.stride(0), a_pool.stride(1), tmp.stride(0), tmp.stride(1),
        DOT_PRECISION=_precision(x.dtype), GEMV=block_m == 1, SPLIT_K=split_k, HAS_ORDER=token_order is not None,
        BLOCK_M=block_m, BLOCK_R=_block_r(max_rank), BLOCK_K=block_k or (128 if block_m == 1 else 64),
        num_warps=num_warps or (8 if block_m == 1 else 4),
    )
    return tmp


def lora_expand_triton(
    tmp: torch.Tensor, b_pool: torch.Tensor, seg_starts: torch.Tensor, seg_slots: torch.Tensor, ranks: torch.Tensor,
    scalings: torch.Tensor, slice_offsets: torch.Tensor, y: torch.Tensor, max_seg_len: int | None = None,
    token_order: torch.Tensor | None = None, block_n: int | None = None, num_warps: int | None = None,
) -> None:
    """``radixlm.kernels.lora.lora_expand`` in one launch (CUDA, or CPU tensors under the interpreter); the
    launch parameters default to ``expand_config``'s (overrides: as the shrink's)."""
    _check_rows(y, "y")
    num_tokens, n_total = y.shape
    num_slices = slice_offsets.shape[0] - 1
    max_rank = b_pool.shape[2]
    num_segs = seg_slots.shape[0]
    if num_tokens == 0 or num_segs == 0:
        return
    block_m = _block_m(num_tokens if max_seg_len is None else max_seg_len)
    default_n, default_warps = expand_config(block_m, num_slices)
    block_n, num_warps = block_n or default_n, num_warps or default_warps
    grid = (triton.cdiv(num_tokens if max_seg_len is None else max_seg_len, block_m), num_segs,
            triton.cdiv(n_total, block_n))
    _lora_expand_kernel[grid](
        tmp, b_pool, y, seg_starts, seg_slots, ranks, scalings, slice_offsets,
        seg_starts if token_order is None else token_order, n_total, max_rank, tmp.shape[0], tmp.stride(0),
        tmp.stride(1), b_pool.stride(0), b_pool.stride(1), y.stride(0),
        NUM_SLICES=num_slices, DOT_PRECISION=_precision(b_pool.dtype), GEMV=block_m == 1,
        HAS_ORDER=token_order is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=_block_r(max_rank),
        num_warps=num_warps,
    )



@triton.jit
def _lora_expand_dense_kernel(
    s_ptr, b_ptr, y_ptr, row_slots_ptr, scalings_ptr, offsets_ptr, chunks_ptr, num_chunks_ptr,
    num_rows, n_total, max_rank, stride_sm, stride_ss, stride_sj, stride_bs, stride_bn, stride_br, stride_ym,
    NUM_SLICES: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < num_rows
    row_slot = tl.load(row_slots_ptr + offs_m, mask=m_ok, other=-1)
    has = row_slot >= 0
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_total
    offs_c = tl.arange(0, CHUNK)
    s_rows = s_ptr + offs_m.to(tl.int64)[:, None] * stride_sm + offs_c[None, :]  # [BLOCK_M, CHUNK]
    b_tile = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn + offs_c[:, None] * stride_br  # [CHUNK, BLOCK_N]
    num_chunks = tl.load(num_chunks_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j in tl.static_range(NUM_SLICES):
        lo = tl.load(offsets_ptr + j)
        hi = tl.load(offsets_ptr + j + 1)
        if (lo < n0 + BLOCK_N) & (hi > n0):  # one slice per tile unless a slice boundary falls inside it
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for i in tl.range(0, num_chunks, num_stages=NUM_STAGES):
                kc = tl.load(chunks_ptr + i)
                slot = kc // max_rank
                r0 = kc - slot * max_rank
                # Only the rows of the chunk's slot: the other rows' products with this adapter are not loaded.
                sv = tl.load(s_rows + slot * stride_ss + j * stride_sj + r0, mask=(row_slot == slot)[:, None],
                             other=0.0)
                b = tl.load(b_tile + slot.to(tl.int64) * stride_bs + r0 * stride_br, mask=n_ok[None, :], other=0.0)
                part = tl.dot(sv, b, part, input_precision=DOT_PRECISION)
            if NUM_SLICES == 1:
                acc = part
            else:
                acc += tl.where(((offs_n >= lo) & (offs_n < hi))[None, :], part, 0.0)
    row_scale = tl.load(scalings_ptr + row_slot, mask=has, other=0.0)
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    mask = has[:, None] & n_ok[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + row_scale[:, None] * acc).to(y_ptr.dtype.element_ty), mask=mask)


def lora_expand_dense_triton(
    s: torch.Tensor, b_pool: torch.Tensor, row_slots: torch.Tensor, scalings: torch.Tensor,
    slice_offsets: torch.Tensor, y: torch.Tensor, chunks: torch.Tensor, num_chunks: torch.Tensor,
    block_m: int | None = None, block_n: int = 128, num_warps: int = 4, num_stages: int = 3,
) -> None:
    """``radixlm.kernels.lora.lora_expand_dense`` in one launch (CUDA, or CPU tensors under the interpreter)."""
    _check_rows(y, "y")
    num_tokens, n_total = y.shape
    max_rank = b_pool.shape[2]
    num_slices = slice_offsets.shape[0] - 1
    if num_tokens == 0:
        return
    if block_m is None:
        block_m = min(128, max(16, triton.next_power_of_2(num_tokens)))
    grid = (triton.cdiv(num_tokens, block_m), triton.cdiv(n_total, block_n))
    _lora_expand_dense_kernel[grid](
        s, b_pool, y, row_slots, scalings, slice_offsets, chunks, num_chunks,
        num_tokens, n_total, max_rank, s.stride(0), s.stride(1), s.stride(2), b_pool.stride(0), b_pool.stride(1),
        b_pool.stride(2), y.stride(0),
        NUM_SLICES=num_slices, DOT_PRECISION=_precision(s.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, CHUNK=16, NUM_STAGES=num_stages, num_warps=num_warps,
    )
