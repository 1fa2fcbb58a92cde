"""``radixlm.kernels.lora`` (segmented LoRA shrink / expand over an adapter pool): ``build_segments`` exactly, and
both paths (the torch references, the CPU path; the Triton kernels, under the interpreter on CPU) against float64
math on mixed batches: base-only requests, adapters of ranks 8, 16 and the pool's maximum 32, a one-token
segment, empty segments, merged slices of unequal widths (q wider than k and v), and x / y as row views of wider
tensors (the stride contract: any row stride, unit column stride).  The pool's padding beyond each slot's rank
is NaN, so a kernel that reads it poisons its output.

Error bound, elementwise, against float64: ``|y - y64| <= (K + max_rank + 2) * 2^-24 * M + e_in * M + 2^-p * |y64|``
with ``M = |y0| + scaling * (|x| |A|^T) |B|^T`` (the magnitudes the sums run over):
- the first term is fp32 accumulation over the K products of the shrink, the rank products of the expand and
  the final add (the classical gamma_n bound of a dot product, n = K + rank + 2);
- ``e_in``: 0, except for the kernels with a half-precision pool, whose expand (dot form) multiplies ``tmp``
  rounded to the pool's dtype (2^-p, p as below; the GEMV form, one-token segments, multiplies in fp32);
- the last term is the single rounding of y to its dtype (p = 24 for float32, 11 for float16, 8 for bfloat16).
x, A and B are drawn in the test dtype, so their float64 copies are exactly the operands the kernels see, and
half-precision products are exact in fp32.  bfloat16 runs on a GPU only (the interpreter's bf16 dots are not
IEEE).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported: decoration picks the mode

import pytest  # noqa: E402

from radixlm.kernels.lora import (  # noqa: E402
    LoraSegments, apply_lora, build_segments, decode_segments, lora_expand_dense, lora_expand_dense_ref,
    lora_expand_dense_silu_mul, lora_expand_ref, lora_shrink_ref,
)
from radixlm.kernels.lora_triton import (  # noqa: E402
    ExpandConfig, default_split_k, expand_config, lora_expand_dense_silu_mul_triton, lora_expand_dense_triton,
    lora_expand_triton, lora_shrink_triton,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
ON_GPU = pytest.mark.skipif(not CUDA, reason="needs a GPU")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
MANTISSA = {torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}

K = 160  # not a multiple of the K tiles (64, 128): the tail masks are exercised
MAX_RANK = 32
WIDTHS = (48, 16, 16)  # q, k, v of a merged projection
RANKS = (8, 32, 16, 4)  # per slot; slot 3 is resident but unused by the batches below
SCALINGS = (0.5, 2.0, 0.25, 1.0)


class Pool(NamedTuple):
    a: torch.Tensor  # [slots, num_slices * MAX_RANK, K]
    b: torch.Tensor  # [slots, N_total, MAX_RANK]
    ranks: torch.Tensor
    scalings: torch.Tensor
    offsets: torch.Tensor  # [num_slices + 1] int32


def make_pool(widths: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> Pool:
    """Random adapters, NaN beyond each slot's rank."""
    g = torch.Generator().manual_seed(seed)
    num_slices, n_total = len(widths), sum(widths)
    a = torch.randn(len(RANKS), num_slices * MAX_RANK, K, generator=g) / K**0.5
    b = torch.randn(len(RANKS), n_total, MAX_RANK, generator=g) / MAX_RANK**0.5
    for slot, rank in enumerate(RANKS):
        for s in range(num_slices):
            a[slot, s * MAX_RANK + rank:(s + 1) * MAX_RANK] = float("nan")
        b[slot, :, rank:] = float("nan")
    offsets = [0]
    for w in widths:
        offsets.append(offsets[-1] + w)
    return Pool(a.to(dtype).to(DEVICE), b.to(dtype).to(DEVICE), torch.tensor(RANKS, dtype=torch.int32, device=DEVICE),
                torch.tensor(SCALINGS, dtype=torch.float32, device=DEVICE),
                torch.tensor(offsets, dtype=torch.int32, device=DEVICE))


def expected(x: torch.Tensor, y0: torch.Tensor, pool: Pool, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(y in float64, the magnitude M of the error bound) for per-token slots."""
    num_slices = pool.offsets.shape[0] - 1
    offsets = pool.offsets.tolist()
    y = y0.double().cpu().clone()
    mag = y0.double().cpu().abs()
    for t, slot in enumerate(slots):
        if slot < 0:
            continue
        rank, scaling = RANKS[slot], SCALINGS[slot]
        xt = x[t].double().cpu()
        for s in range(num_slices):
            a = pool.a[slot, s * MAX_RANK:s * MAX_RANK + rank].double().cpu()  # [rank, K]
            b = pool.b[slot, offsets[s]:offsets[s + 1], :rank].double().cpu()  # [width, rank]
            y[t, offsets[s]:offsets[s + 1]] += scaling * (b @ (a @ xt))
            mag[t, offsets[s]:offsets[s + 1]] += scaling * (b.abs() @ (a.abs() @ xt.abs()))
    return y, mag


def assert_close(y: torch.Tensor, y64: torch.Tensor, mag: torch.Tensor, triton_path: bool) -> None:
    e_in = 2.0 ** -MANTISSA[y.dtype] if triton_path and y.dtype != torch.float32 else 0.0
    bound = (K + MAX_RANK + 2) * 2.0**-24 * mag + e_in * mag + 2.0 ** -MANTISSA[y.dtype] * y64.abs()
    err = (y.double().cpu() - y64).abs()
    assert torch.isfinite(err).all()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"


def per_token_slots(slots: list[int], num_tokens: list[int]) -> list[int]:
    return [slot for slot, n in zip(slots, num_tokens) for _ in range(n)]


# Requests in batch order: the max-rank adapter, a base-only request longer than the qkv case's pieces, a one-token
# request of the rank-8 adapter, a request without tokens, the rank-16 adapter's merged pair.
MIXED = ([1, -1, 0, 2, -1, 1, 2, 2], [7, 9, 1, 0, 2, 5, 6, 4])


def run(path: str, x, y, pool: Pool, seg: LoraSegments, max_seg_len: int | None, split_k: int | None) -> None:
    num_slices = pool.offsets.shape[0] - 1
    if path == "triton":
        tmp = lora_shrink_triton(x, pool.a, seg.seg_starts, seg.seg_slots, pool.ranks, num_slices, max_seg_len,
                                 split_k)
        lora_expand_triton(tmp, pool.b, seg.seg_starts, seg.seg_slots, pool.ranks, pool.scalings, pool.offsets, y,
                           max_seg_len)
    else:
        tmp = lora_shrink_ref(x, pool.a, seg.seg_starts, seg.seg_slots, pool.ranks, num_slices)
        lora_expand_ref(tmp, pool.b, seg.seg_starts, seg.seg_slots, pool.ranks, pool.scalings, pool.offsets, y)


def test_build_segments_exact() -> None:
    seg = build_segments(*MIXED, "cpu")
    assert seg.seg_starts.tolist() == [0, 7, 16, 17, 19, 24, 34]  # the request without tokens makes no segment
    assert seg.seg_slots.tolist() == [1, -1, 0, -1, 1, 2]
    assert seg.seg_starts.dtype == seg.seg_slots.dtype == torch.int32
    assert (seg.max_seg_len, seg.has_lora) == (10, True)  # adapter segments only: the base-only run is free
    per_request = build_segments([3, 3, -1], [1, 1, 1], "cpu", merge=False, num_segs=5)
    assert per_request.seg_starts.tolist() == [0, 1, 2, 3, 3, 3]
    assert per_request.seg_slots.tolist() == [3, 3, -1, -1, -1]
    assert (per_request.max_seg_len, per_request.has_lora) == (1, True)
    # no adapter with tokens: the base-only fast path
    assert not build_segments([-1, 2, -1], [4, 0, 1], "cpu").has_lora
    assert not build_segments([], [], "cpu", num_segs=2).has_lora
    with pytest.raises(ValueError):
        build_segments([0, 1, 0], [1, 1, 1], "cpu", num_segs=2)
    pieces = build_segments(*MIXED, "cpu", split=4)
    assert pieces.seg_starts.tolist() == [0, 4, 7, 16, 17, 19, 23, 24, 28, 32, 34]  # base-only runs stay whole
    assert pieces.seg_slots.tolist() == [1, 1, -1, 0, -1, 1, 1, 2, 2, 2]
    assert pieces.max_seg_len == 4
    cut = build_segments(*MIXED, "cpu", split=4, split_base=True)  # ... unless asked (the dense decode)
    assert cut.seg_starts.tolist() == [0, 4, 7, 11, 15, 16, 17, 19, 23, 24, 28, 32, 34]
    assert cut.seg_slots.tolist() == [1, 1, -1, -1, -1, 0, -1, 1, 1, 2, 2, 2]


def test_build_segments_sorted_exact() -> None:
    """``sort``: requests grouped by slot (stable), one segment per slot, ``token_order`` mapping positions to the
    batch's tokens; padded to a graph's token count with the identity tail."""
    seg = build_segments([2, -1, 0, 2, 0], [1, 3, 2, 0, 1], "cpu", sort=True, split=2, num_order=9,
                         split_base=True)
    # by slot: -1 (tokens 1-3, in pieces of 2), 0 (tokens 4-5, then 6), 2 (token 0; the request without tokens
    # adds none), then the padding's identity tail
    assert seg.token_order.tolist() == [1, 2, 3, 4, 5, 6, 0, 7, 8]
    assert seg.seg_starts.tolist() == [0, 2, 3, 5, 6, 7]
    assert seg.seg_slots.tolist() == [-1, -1, 0, 0, 2]
    assert seg.token_order.dtype == torch.int32 and (seg.max_seg_len, seg.has_lora) == (2, True)
    assert build_segments([1, 0], [1, 1], "cpu").token_order is None
    with pytest.raises(ValueError):
        build_segments([1, 0], [2, 2], "cpu", sort=True, num_order=3)


def test_build_segments_split_bound() -> None:
    """The documented segment bound, cdiv(T, split) + runs - 1, over random sorted layouts (tight for some)."""
    g = torch.Generator().manual_seed(0)
    tight = False
    for _ in range(200):
        num_requests = int(torch.randint(1, 40, (1,), generator=g))
        slots = sorted(torch.randint(-1, 6, (num_requests,), generator=g).tolist())
        tokens = torch.randint(0, 30, (num_requests,), generator=g).tolist()
        split = int(torch.randint(1, 20, (1,), generator=g))
        seg = build_segments(slots, tokens, "cpu", split=split)
        bound = max(-(-sum(tokens) // split) + len({s for s, n in zip(slots, tokens) if n}) - 1, 0)
        assert seg.seg_slots.shape[0] <= bound
        assert all(b - a <= split for a, b, s in zip(seg.seg_starts, seg.seg_starts[1:], seg.seg_slots) if s >= 0)
        assert seg.seg_starts[-1].item() == sum(tokens)
        tight |= seg.seg_slots.shape[0] == bound > 1
    assert tight


@pytest.mark.parametrize("path", ["triton", "ref"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("widths", [WIDTHS, (40,)], ids=["qkv", "one-slice"])
def test_mixed_prefill_batch(path: str, dtype: torch.dtype, widths: tuple[int, ...]) -> None:
    """Prefill-like segments, padded with empty ones; x and y are column windows of wider tensors.  qkv: the grid
    bound is the batch's ``max_seg_len``, K split in 3; one slice: the default bound (the token count) and
    split."""
    pool = make_pool(widths, dtype)
    # qkv: merged segments cut in pieces of 4 tokens (the graph-friendly layout)
    seg = build_segments(*MIXED, DEVICE, split=4 if len(widths) > 1 else None, num_segs=12)
    slots = per_token_slots(*MIXED)
    num_tokens, n_total = len(slots), sum(widths)
    g = torch.Generator().manual_seed(1)
    x_wide = torch.randn(num_tokens, K + 16, generator=g).to(dtype).to(DEVICE)
    y_wide = torch.randn(num_tokens, n_total + 8, generator=g).to(dtype).to(DEVICE)
    x, y = x_wide[:, 8:8 + K], y_wide[:, :n_total]
    before = y_wide.clone()
    y64, mag = expected(x, y, pool, slots)
    qkv = len(widths) > 1
    run(path, x, y, pool, seg, seg.max_seg_len if qkv else None, 3 if qkv else None)
    assert_close(y, y64, mag, path == "triton")
    base_rows = [t for t, s in enumerate(slots) if s < 0]
    assert torch.equal(y_wide[base_rows], before[base_rows])  # bit-unchanged
    assert torch.equal(y_wide[:, n_total:], before[:, n_total:])  # outside y's window


@pytest.mark.parametrize("path", ["triton", "ref"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_one_segment_per_request(path: str, dtype: torch.dtype) -> None:
    """Decode: one token per request, one segment each (the GEMV form, ``max_seg_len`` 1), slots unsorted, K
    split in 2."""
    slots = [2, -1, 1, 1, 0, -1, 2]
    pool = make_pool(WIDTHS, dtype, seed=2)
    seg = build_segments(slots, [1] * len(slots), DEVICE, merge=False)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(len(slots), K, generator=g).to(dtype).to(DEVICE)
    y = torch.randn(len(slots), sum(WIDTHS), generator=g).to(dtype).to(DEVICE)
    before = y.clone()
    y64, mag = expected(x, y, pool, slots)
    run(path, x, y, pool, seg, seg.max_seg_len, 2)
    assert_close(y, y64, mag, path == "triton")
    assert torch.equal(y[[1, 5]], before[[1, 5]])


@pytest.mark.parametrize("path", ["triton", "ref"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [1, 3], ids=["decode", "prefill"])
def test_sorted_batch_through_token_order(path: str, dtype: torch.dtype, tokens: int) -> None:
    """Interleaved adapters grouped by ``sort`` without moving the tokens: x's rows gathered, y's scattered (GEMV
    form for one-token requests, the dot form in pieces of 2 for three-token ones); base-only rows untouched."""
    slots = [2, -1, 1, 0, 1, -1, 2, 0, 1]
    counts = [tokens] * len(slots)
    pool = make_pool(WIDTHS, dtype, seed=4)
    seg = build_segments(slots, counts, DEVICE, sort=True, split=None if tokens == 1 else 2)
    token_slots = per_token_slots(slots, counts)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(len(token_slots), K, generator=g).to(dtype).to(DEVICE)
    y = torch.randn(len(token_slots), sum(WIDTHS), generator=g).to(dtype).to(DEVICE)
    before = y.clone()
    y64, mag = expected(x, y, pool, token_slots)
    num_slices = len(WIDTHS)
    if path == "triton":
        tmp = lora_shrink_triton(x, pool.a, seg.seg_starts, seg.seg_slots, pool.ranks, num_slices, seg.max_seg_len,
                                 2, seg.token_order)
        lora_expand_triton(tmp, pool.b, seg.seg_starts, seg.seg_slots, pool.ranks, pool.scalings, pool.offsets, y,
                           seg.max_seg_len, seg.token_order)
    else:
        tmp = lora_shrink_ref(x, pool.a, seg.seg_starts, seg.seg_slots, pool.ranks, num_slices, seg.token_order)
        lora_expand_ref(tmp, pool.b, seg.seg_starts, seg.seg_slots, pool.ranks, pool.scalings, pool.offsets, y,
                        seg.token_order)
    assert_close(y, y64, mag, path == "triton")
    base_rows = [t for t, s in enumerate(token_slots) if s < 0]
    assert torch.equal(y[base_rows], before[base_rows])


def test_shrink_tmp_contract() -> None:
    """tmp is float32 [1, T, slices x max rank], the product summed over the K splits by the last split of each
    tile (serial split-K: a split past K, 4 splits of 3 K tiles, adds 0); columns at and beyond a slot's rank are
    exactly 0 (the NaN padding is not read); the split counters are zero again after each launch, so a second
    launch (GEMV form, then the dot form) sums as the first did."""
    from radixlm.kernels.lora_triton import _split_counters

    pool = make_pool(WIDTHS, torch.float32)
    x = torch.randn(5, K, device=DEVICE)
    for seg in (build_segments([1, 0, 1, 0, 1], [1] * 5, DEVICE, merge=False)._replace(max_seg_len=1),
                build_segments([1, 0], [3, 2], DEVICE)):
        ref = lora_shrink_ref(x, pool.a, seg.seg_starts, seg.seg_slots, pool.ranks, 3).view(1, 5, 3, MAX_RANK)
        for _ in range(2):
            tmp = lora_shrink_triton(x, pool.a, seg.seg_starts, seg.seg_slots, pool.ranks, 3, seg.max_seg_len, 4)
            assert tmp.dtype == torch.float32 and tmp.shape == (1, 5, 3 * MAX_RANK)
            tmp = tmp.view(1, 5, 3, MAX_RANK)
            rows0 = [i for i, s in enumerate(torch.repeat_interleave(seg.seg_slots.cpu(), seg.seg_starts.diff().cpu()))
                     if s == 0]
            assert not tmp[0, rows0, :, RANKS[0]:].any()
            torch.testing.assert_close(tmp, ref, rtol=1e-5, atol=1e-5)
            assert not _split_counters(x.device).any()
    y = torch.zeros(5, sum(WIDTHS), device=DEVICE)
    with pytest.raises(ValueError, match="single plane"):
        lora_expand_triton(torch.zeros(2, 5, 3 * MAX_RANK, device=DEVICE), pool.b, seg.seg_starts, seg.seg_slots,
                           pool.ranks, pool.scalings, pool.offsets, y, seg.max_seg_len)


def dense_operands(dtype: torch.dtype, slots: list[int], widths: tuple[int, ...] = WIDTHS,
                   seed: int = 7) -> tuple[Pool, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pool, x, y0, y_ext, expected magnitudes' inputs): the dense GEMM's output ``[y0 | x @ A_all^T]`` in
    ``dtype``, the shrink rounded to it as the GEMM's output is (its NaN padding zeroed: the GEMM reads every
    row of the pool)."""
    pool = make_pool(widths, dtype, seed=seed)
    pool = pool._replace(a=torch.nan_to_num(pool.a, nan=0.0))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(slots), K, generator=g).to(dtype).to(DEVICE)
    y0 = torch.randn(len(slots), sum(widths), generator=g).to(dtype).to(DEVICE)
    tmp = (x.double() @ pool.a.reshape(-1, K).double().T).to(dtype)  # [T, slots * W]
    return pool, x, y0, torch.cat([y0, tmp], dim=1), tmp


# Launches of the dense expands: the default, and 16-column tiles three to a program, pipelined two deep (a
# program's last tiles past the columns: masked)
LAUNCHES = [{}, dict(block_n=16, n_tiles=3, num_stages=2)]


@pytest.mark.parametrize("path,launch", [("triton", {}), ("triton", LAUNCHES[1]), ("ref", {})],
                         ids=["triton", "triton-tiles", "ref"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [5, 40], ids=["gemv", "pieces"])
def test_dense_expand(path: str, launch: dict, dtype: torch.dtype, rows: int) -> None:
    """The dense decode's expand: every row of ``out`` written, adapter rows ``y0 + scaling * tmp B^T`` with
    ``tmp`` read from the row's own slot's columns of the GEMM's tail (rank 4 slot 3 never named; base rows
    and the graph's padding rows copied bit for bit), for the two decode layouts (one-row segments; rows sorted
    by slot in pieces of 16, the base run cut into pieces too).  The bound's e_in is the GEMM's rounding of
    tmp."""
    slots = [(i * 7) % 4 - 1 for i in range(rows)]  # -1, 2, 1, 0, -1, ... (slot 2 rank 16, 1 the max 32, 0 rank 8)
    slots = [s if s != 2 or i % 3 else -1 for i, s in enumerate(slots)]
    padded = rows + 3  # a graph's padded size: rows past the batch are base rows
    seg = decode_segments(slots, len(RANKS), DEVICE, rows=padded, dense=True)
    assert seg.dense and (seg.max_seg_len == 1) == (padded <= 16)
    pool, x, y0, y_ext, tmp = dense_operands(dtype, slots + [-1] * 3)
    out = torch.full_like(y0, float("nan"))
    args = (pool.b, seg.seg_starts, seg.seg_slots, pool.ranks, pool.scalings, pool.offsets)
    if path == "triton":
        lora_expand_dense_triton(y_ext, out, *args, seg.max_seg_len, seg.token_order, **launch)
    else:
        lora_expand_dense_ref(y_ext, out, *args, seg.token_order)
    token_slots = slots + [-1] * 3
    # float64 reference from the rounded tmp (what the GEMM hands over)
    want, mag = y0.double().cpu().clone(), y0.double().cpu().abs()
    offsets, width = pool.offsets.tolist(), len(WIDTHS) * MAX_RANK
    for t, slot in enumerate(token_slots):
        if slot < 0:
            continue
        rank, scaling = RANKS[slot], SCALINGS[slot]
        for sl in range(len(WIDTHS)):
            h = tmp[t, slot * width + sl * MAX_RANK:slot * width + sl * MAX_RANK + rank].double().cpu()
            b = pool.b[slot, offsets[sl]:offsets[sl + 1], :rank].double().cpu()
            want[t, offsets[sl]:offsets[sl + 1]] += scaling * (b @ h)
            mag[t, offsets[sl]:offsets[sl + 1]] += scaling * (b.abs() @ h.abs())
    assert_close(out, want, mag, triton_path=path == "triton")
    base_rows = [t for t, s in enumerate(token_slots) if s < 0]
    assert torch.equal(out[base_rows], y0[base_rows])


@pytest.mark.parametrize("path,launch", [("triton", {}), ("triton", LAUNCHES[1]), ("ref", {})],
                         ids=["triton", "triton-tiles", "ref"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [5, 40], ids=["gemv", "pieces"])
def test_dense_expand_silu_mul(path: str, launch: dict, dtype: torch.dtype, rows: int) -> None:
    """The gate_up expand with the SiLU-mul epilogue: every row of ``out`` [T, inter] is ``silu(g) * u`` of the
    row's base output plus its adapter (none for base and padding rows), against float64 math from the same
    rounded shrink: fp32 work rounded once (relative 2^-p plus fp32 noise)."""
    widths = (24, 24)
    slots = [(i * 5) % 4 - 1 for i in range(rows)] + [-1] * 3
    seg = decode_segments(slots[:rows], len(RANKS), DEVICE, rows=rows + 3, dense=True)
    pool, x, y0, y_ext, tmp = dense_operands(dtype, slots, widths)
    out = torch.full((len(slots), 24), float("nan"), dtype=dtype, device=DEVICE)
    args = (pool.b, seg.seg_starts, seg.seg_slots, pool.ranks, pool.scalings, seg.max_seg_len, seg.token_order)
    if path == "triton":
        lora_expand_dense_silu_mul_triton(y_ext, out, *args, **launch)
    elif CUDA:
        pytest.skip("on a GPU the dispatcher runs the kernel: the torch path is tested on CPU")
    else:
        lora_expand_dense_silu_mul(y_ext, out, *args)
    full = y0.double().cpu().clone()
    width = 2 * MAX_RANK
    for t, slot in enumerate(slots):
        if slot < 0:
            continue
        for sl in range(2):
            h = tmp[t, slot * width + sl * MAX_RANK:slot * width + sl * MAX_RANK + RANKS[slot]].double().cpu()
            b = pool.b[slot, sl * 24:(sl + 1) * 24, :RANKS[slot]].double().cpu()
            full[t, sl * 24:(sl + 1) * 24] += SCALINGS[slot] * (b @ h)
    gate, up = full.chunk(2, dim=1)
    want = torch.nn.functional.silu(gate) * up
    tol = 2.0 ** -MANTISSA[dtype] + 2.0 ** -18
    err = (out.double().cpu() - want).abs()
    assert (err <= tol * want.abs() + 1e-5).all(), f"max err {err.max().item():.3g}"


def test_dense_expand_dispatch_and_shape_check() -> None:
    """``lora_expand_dense`` runs the kernel on a GPU and the reference elsewhere, both within the fp32 bound
    of the other path; a GEMM output that does not match the pool is refused."""
    slots = [0, -1, 1, 2, 1]
    seg = decode_segments(slots, len(RANKS), DEVICE, dense=True)
    pool, x, y0, y_ext, tmp = dense_operands(torch.float32, slots)
    out, ref = torch.empty_like(y0), torch.empty_like(y0)
    args = (pool.b, seg.seg_starts, seg.seg_slots, pool.ranks, pool.scalings, pool.offsets)
    lora_expand_dense(y_ext, out, *args, seg.max_seg_len, seg.token_order)
    lora_expand_dense_ref(y_ext, ref, *args, seg.token_order)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not match"):
        lora_expand_dense(y_ext[:, :-1], out, *args, seg.max_seg_len, seg.token_order)


def test_default_split_k() -> None:
    """Few programs on a long K split (up to four programs per SM, K >= 256 per split, at most 32); many do
    not."""
    assert default_split_k(programs=23, k_dim=14336, num_sms=132) == 32
    assert default_split_k(programs=48, k_dim=4096, num_sms=132) == 16  # gate_up decode, 16 adapters
    assert default_split_k(programs=69, k_dim=4096, num_sms=132) == 8
    assert default_split_k(programs=300, k_dim=4096, num_sms=132) == 2
    assert default_split_k(programs=600, k_dim=4096, num_sms=132) == 1
    assert default_split_k(programs=1, k_dim=1000, num_sms=132) == 2  # 250 of K a split would be too little


def test_expand_config() -> None:
    assert expand_config(block_m=1, num_slices=3) == ExpandConfig(64, 4, 1, 1)
    assert expand_config(block_m=16, num_slices=2) == ExpandConfig(128, 4, 1, 2)
    assert expand_config(block_m=16, num_slices=2, silu_mul=True) == ExpandConfig(128, 4, 2, 2)
    assert expand_config(block_m=1, num_slices=2, silu_mul=True) == ExpandConfig(64, 4, 1, 1)
    assert expand_config(block_m=16, num_slices=1) == ExpandConfig(64, 4, 1, 1)
    assert expand_config(block_m=64, num_slices=3) == ExpandConfig(128, 4, 1, 1)
    assert expand_config(block_m=64, num_slices=1) == ExpandConfig(256, 8, 1, 1)


def test_expand_config_overrides(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """RADIXLM_LORA_EXPAND_CONFIGS names decode expands' launches by (kind, N, BLOCK_M); explicit arguments win,
    other shapes keep expand_config's."""
    from radixlm.kernels import lora_triton

    table = tmp_path / "expand.json"
    table.write_text('{"dense,6144,16": [128, 4, 4, 3], "silu,14336,16": [64, 8, 2, 2]}')
    monkeypatch.setenv("RADIXLM_LORA_EXPAND_CONFIGS", str(table))
    lora_triton.expand_config_overrides.cache_clear()
    try:
        assert lora_triton._expand_launch("dense", 6144, 16, 3, None, None, None, None) == ExpandConfig(128, 4, 4, 3)
        assert lora_triton._expand_launch("silu", 14336, 16, 1, None, None, 1, None) == ExpandConfig(64, 8, 1, 2)
        assert lora_triton._expand_launch("dense", 6144, 1, 3, None, None, None, None) == ExpandConfig(64, 4, 1, 1)
        assert lora_triton._expand_launch("silu", 1024, 16, 1, None, None, None, None) == ExpandConfig(128, 4, 2, 2)
    finally:
        monkeypatch.delenv("RADIXLM_LORA_EXPAND_CONFIGS")
        lora_triton.expand_config_overrides.cache_clear()


def test_apply_lora_base_only_launches_nothing() -> None:
    """``has_lora`` false: nothing runs, even with metadata that names adapters (the check is on the host)."""
    pool = make_pool(WIDTHS, torch.float32)
    y = torch.randn(2, sum(WIDTHS), device=DEVICE)
    before = y.clone()
    lying = LoraSegments(torch.tensor([0, 2], dtype=torch.int32, device=DEVICE),
                         torch.tensor([1], dtype=torch.int32, device=DEVICE), 2, False)
    apply_lora(torch.randn(2, K, device=DEVICE), y, pool.a, pool.b, pool.ranks, pool.scalings, pool.offsets, lying)
    assert torch.equal(y, before)


def test_apply_lora_dispatches() -> None:
    """``apply_lora`` (through the ``lora_shrink`` / ``lora_expand`` dispatchers: the kernels on a GPU, the
references on CPU) within the fp32 bound."""
    pool = make_pool(WIDTHS, torch.float32)
    seg = build_segments(*MIXED, DEVICE)
    slots = per_token_slots(*MIXED)
    x = torch.randn(len(slots), K, device=DEVICE)
    y = torch.randn(len(slots), sum(WIDTHS), device=DEVICE)
    y64, mag = expected(x, y, pool, slots)
    apply_lora(x, y, pool.a, pool.b, pool.ranks, pool.scalings, pool.offsets, seg)
    assert_close(y, y64, mag, CUDA)


# --- GPU only ---------------------------------------------------------------------------------------------------


@ON_GPU
@pytest.mark.parametrize("max_seg_len,sort", [(1, False), (8, False), (2, True)])
def test_cuda_graph_replays_new_metadata(max_seg_len: int, sort: bool) -> None:
    """Capture ``apply_lora`` with one layout, replay with other slots and segment boundaries copied into the same
    metadata tensors (same shapes): matches float64 math for the new layout, base-only rows untouched.  ``sort``:
    one-token requests grouped by adapter through ``token_order`` in pieces of 2 (the sorted decode graph)."""
    torch.manual_seed(0)
    pool = make_pool(WIDTHS, torch.bfloat16)
    num_requests = 6
    tokens = [1 if sort else max_seg_len] * num_requests
    num_segs = -(-num_requests // max_seg_len) + len(RANKS) if sort else num_requests

    def layout(slots: list[int], counts: list[int]) -> LoraSegments:
        if sort:
            return build_segments(slots, counts, DEVICE, sort=True, split=max_seg_len, num_segs=num_segs,
                                  num_order=sum(tokens))
        return build_segments(slots, counts, DEVICE, merge=False, num_segs=num_segs)

    first = layout([0, 1, 2, -1, 0, 1], tokens)
    x = torch.randn(sum(tokens), K, device=DEVICE, dtype=torch.bfloat16)
    y = torch.zeros(sum(tokens), sum(WIDTHS), device=DEVICE, dtype=torch.bfloat16)
    static = LoraSegments(first.seg_starts.clone(), first.seg_slots.clone(), max_seg_len, True,
                          None if first.token_order is None else first.token_order.clone())
    apply_lora(x, y, pool.a, pool.b, pool.ranks, pool.scalings, pool.offsets, static)  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        apply_lora(x, y, pool.a, pool.b, pool.ranks, pool.scalings, pool.offsets, static)
    # Replay: other slots and uneven segments (each <= max_seg_len, still 6).
    if sort:
        new_tokens, new_slots = [1, 1, 1, 1, 0, 1], [2, 0, 2, -1, 1, 0]
    else:
        new_tokens = [max_seg_len, max_seg_len - 1, 1, max_seg_len, 0, max_seg_len]  # rows past them: no segment
        new_slots = [-1, 2, 1, 0, 2, 2]
    new = layout(new_slots, new_tokens)
    static.seg_starts.copy_(new.seg_starts)
    static.seg_slots.copy_(new.seg_slots)
    if sort:
        static.token_order.copy_(new.token_order)
    x.copy_(torch.randn_like(x))
    y.copy_(torch.randn_like(y))
    before = y.clone()
    slots = per_token_slots(new_slots, new_tokens) + [-1] * (sum(tokens) - sum(new_tokens))
    y64, mag = expected(x, y, pool, slots)
    graph.replay()
    torch.cuda.synchronize()
    assert_close(y, y64, mag, True)
    base_rows = [t for t, s in enumerate(slots) if s < 0]
    assert torch.equal(y[base_rows], before[base_rows])


@pytest.mark.parametrize("path", ["triton", "ref"])
def test_rank_zero_slot_is_skipped(path: str) -> None:
    """A slot of rank 0 (its adapter leaves this projection alone) is treated like no adapter: its rows of y stay
    bit-unchanged, even with NaN in the slot's A and B, while the other adapter's rows are updated."""
    pool = make_pool(WIDTHS, torch.float32)
    pool.a[0].fill_(float("nan"))
    pool.b[0].fill_(float("nan"))
    ranks = pool.ranks.clone()
    ranks[0] = 0
    pool = pool._replace(ranks=ranks)
    slots = [0, 1, 0]
    seg = build_segments(slots, [2, 3, 1], DEVICE)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, K, generator=g).to(DEVICE)
    y = torch.randn(6, sum(WIDTHS), generator=g).to(DEVICE)
    before = y.clone()
    run(path, x, y, pool, seg, seg.max_seg_len, None)
    assert torch.equal(y[[0, 1, 5]], before[[0, 1, 5]])
    y64, mag = expected(x, before, pool, [-1, -1, 1, 1, 1, -1])
    assert_close(y, y64, mag, path == "triton")
