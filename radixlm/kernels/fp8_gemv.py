"""FP8 GEMMs at decode-sized M (a few tokens): a Triton kernel that streams the FP8 weight once.

At M <= ``SMALL_M`` a linear layer is bound by reading its weight.  A GEMM's M side would be mostly padding, so
the product is computed transposed ("swap AB"): ``out^T [N, M] = W [N, K] x^T [K, M]``, the weight rows on the
MMA's 64-row side and the few tokens, padded to 16, on its narrow side.  Each program owns ``BLOCK_N`` weight
rows and walks its share of K, so the weight goes from memory into the tensor cores as stored, with no conversion:
on sm_90 an FP8 wgmma reads both operands from shared memory.  That dot accumulates with reduced precision (about
14 significand bits, DeepSeek-V3's report), so every K tile (<= 256 products) starts from zero and is added to an
fp32 accumulator, as the block GEMM does.  ``exact`` widens both operands to fp16 for the dot instead: exact, as
E4M3 fits fp16, the products of two 4-bit significands are exact in fp32, so the result is the W8A8 sum with fp32
accumulation throughout (float32 models, whose tests compare at 1e-4).

Few weight rows per program leave the GPU half idle when N is small (Llama-8B's o projection: 64 programs of 64
rows), so ``split_k`` programs share a column tile's K: each writes its fp32 partial to scratch, and the one that
arrives last at the tile's counter (an atomic) adds the partials in split order (deterministic) and writes the
output.  The counters live in a zeroed buffer per device and stream (``_counters``) that every launch leaves
zeroed, so a launch needs no memset and no second kernel, and CUDA graphs replay it as is.

Two weight formats (``fp8_linear``):

- block-wise ``[bn, bk]`` (``weight_scale_inv`` [ceil(N / bn), K / bk]), activations per token per group of
  ``bk``: a K tile is one scale slice, so the tile's dot is scaled by (activation group scale x weight block
  scale) before it joins the accumulator;
- per output channel (online FP8, ``weight_scale`` [N]), activations per token (the unscaled dots accumulate and
  both scales multiply once at the end) or per token per group (a K tile is one group: its dot is scaled by the
  group's scale, the weight's at the end).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from radixlm.kernels import gluon_gemv
from radixlm.kernels.fp8_activation import SMALL_M  # rows at or below which the FP8 linears run this kernel
from radixlm.kernels.launch_tables import read_launch_table
from radixlm.kernels.pdl import pdl_launch_kwargs, pdl_trigger, pdl_wait

_COUNTERS = 1 << 16  # column tiles x row tiles a split launch may have (N up to 4M at 64 rows per tile)
_counter_buffers: dict[tuple[torch.device, int], torch.Tensor] = {}


class GemvConfig(NamedTuple):
    """Launch parameters: ``block_n`` weight rows per program (the MMA's M side: 64 or 128), ``block_k`` the
    per-channel K tile (block weights use their scale block's K), ``split_k`` programs per column tile,
    ``preload`` (0-2) weight tiles a program requests before its PDL wait, into registers (1 by default: GPU run
    O2, 0.3-0.9 us a Llama-8B projection and 1.5 % a batch-1 step; 2 tiles gained less; an L2 prefetch of the
    same bytes gained nothing end to end, run K1).  (Loading the weight
    tiles through a TMA descriptor instead was no faster on an H200, run J2.)"""

    block_n: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 4
    split_k: int = 1
    preload: int = 1


def default_gemv_config(n: int, k: int, num_sms: int) -> GemvConfig:
    """64-row tiles, 128-wide K tiles, 4 stages, one tile preloaded; split K until the launch has about two programs per SM, each
    split keeping >= 1024 of K.  ``bench/gpu/fp8_gemm.py --tune-gemv`` on an H200 (GPU run H2, Llama-3.1-8B and
    DeepSeek-V3 shapes, M 1 and 16, 32 configs): within 8 % of each shape's best (256-wide per-channel tiles, best
    on some shapes alone, lost up to 20 % with this split rule in run H3)."""
    tiles = triton.cdiv(n, 64)
    split = 1
    while split < 8 and tiles * split < 2 * num_sms and k // (2 * split) >= 1024:
        split *= 2
    return GemvConfig(64, 128, 4, 4, split, preload=1)


@functools.cache
def config_overrides() -> dict[tuple[int, int], GemvConfig]:
    """Per-shape launch configs from the JSON file named by ``RADIXLM_GEMV_CONFIGS`` (``{"N,K": [block_n,
    block_k, num_warps, num_stages, split_k], ...}``, as ``bench/gpu/fp8_gemm.py --tune-gemv --write-configs``
    writes them), read once; shapes not listed take ``default_gemv_config``."""
    return {(int(n), int(k)): GemvConfig(*values)
            for (n, k), values in read_launch_table("RADIXLM_GEMV_CONFIGS").items()}


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _counters(device: torch.device | str) -> torch.Tensor:
    """The zeroed int32 counters of split launches on ``device``'s current stream (launches on one stream run
    one after another, so they can share them; each leaves them zeroed)."""
    device = torch.device(device)
    key = (device, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
    buf = _counter_buffers.get(key)
    if buf is None:
        buf = _counter_buffers[key] = torch.zeros(_COUNTERS, dtype=torch.int32, device=device)
    return buf


@triton.jit
def _weight_tile(w_ptr, offs_wn, offs_k, k, k_end, stride_wn):
    """The weight's [BLOCK_N, BLOCK_K] fp8 tile at column ``k``; zeros past the program's K range."""
    k_ok = offs_k < k_end - k  # k_end <= K
    return tl.load(w_ptr + offs_wn[:, None] * stride_wn + k + offs_k[None, :], mask=k_ok[None, :], other=0.0)


@triton.jit
def _gemv_step(acc, w, k, k_end, xq_ptr, xs_ptr, ws_ptr, rows, m_ok, offs_k, offs_wn, group_n, group_k,
               stride_xm, stride_xsm, stride_wsn,
               PER_CHANNEL: tl.constexpr, X_GROUPED: tl.constexpr, EXACT: tl.constexpr):
    """``acc`` [BLOCK_N, BLOCK_M] plus weight tile ``w`` times the activations' K tile at ``k``, scaled per
    group where the scales are grouped."""
    k_ok = offs_k < k_end - k  # k_end <= K
    x = tl.load(xq_ptr + rows[None, :] * stride_xm + k + offs_k[:, None], mask=k_ok[:, None] & m_ok[None, :],
                other=0.0)  # [BLOCK_K, BLOCK_M] fp8
    if EXACT:
        part = tl.dot(w.to(tl.float16), x.to(tl.float16))
    else:
        part = tl.dot(w, x)
    if X_GROUPED:
        k_slice = k // group_k
        x_s = tl.load(xs_ptr + rows * stride_xsm + k_slice, mask=m_ok, other=0.0)  # [BLOCK_M]
        if PER_CHANNEL:
            acc += part * x_s[None, :]
        else:
            w_s = tl.load(ws_ptr + (offs_wn // group_n) * stride_wsn + k_slice)  # [BLOCK_N]
            acc += part * w_s[:, None] * x_s[None, :]
    else:
        acc += part
    return acc


@triton.jit
def _fp8_gemv_kernel(
    xq_ptr, xs_ptr, w_ptr, ws_ptr, out_ptr, part_ptr, count_ptr,
    m_dim, n_dim, k_dim, group_n, group_k,
    stride_xm, stride_xsm, stride_wn, stride_wsn, stride_om,
    PER_CHANNEL: tl.constexpr, X_GROUPED: tl.constexpr, EXACT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, PRELOAD: tl.constexpr, PDL: tl.constexpr,
):
    # Program (column tile, K split, row tile): out^T[cols, rows] over its K range.
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Wrapped columns keep the weight loads in bounds without a mask; their results are not stored.
    offs_wn = (offs_n % n_dim).to(tl.int64)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < m_dim
    rows = offs_m.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    k_per_split = tl.cdiv(tl.cdiv(k_dim, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, k_dim)
    # The weight does not depend on the kernels before: the program's first PRELOAD tiles are requested before
    # the wait, their latency spent while the kernel before finishes (activations only after it).
    if PRELOAD >= 1:
        w_first = _weight_tile(w_ptr, offs_wn, offs_k, k_start, k_end, stride_wn)
    if PRELOAD >= 2:
        w_second = _weight_tile(w_ptr, offs_wn, offs_k, k_start + BLOCK_K, k_end, stride_wn)
    pdl_wait(PDL)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    if PRELOAD >= 1:
        acc = _gemv_step(acc, w_first, k_start, k_end, xq_ptr, xs_ptr, ws_ptr, rows, m_ok, offs_k, offs_wn,
                         group_n, group_k, stride_xm, stride_xsm, stride_wsn, PER_CHANNEL, X_GROUPED, EXACT)
    if PRELOAD >= 2:
        acc = _gemv_step(acc, w_second, k_start + BLOCK_K, k_end, xq_ptr, xs_ptr, ws_ptr, rows, m_ok, offs_k,
                         offs_wn, group_n, group_k, stride_xm, stride_xsm, stride_wsn, PER_CHANNEL, X_GROUPED, EXACT)
    for k in range(k_start + PRELOAD * BLOCK_K, k_end, BLOCK_K):
        w = _weight_tile(w_ptr, offs_wn, offs_k, k, k_end, stride_wn)  # [BLOCK_N, BLOCK_K] fp8
        acc = _gemv_step(acc, w, k, k_end, xq_ptr, xs_ptr, ws_ptr, rows, m_ok, offs_k, offs_wn, group_n,
                         group_k, stride_xm, stride_xsm, stride_wsn, PER_CHANNEL, X_GROUPED, EXACT)
    pdl_trigger(PDL)  # after the stream over the weight (``radixlm.kernels.pdl``)
    if PER_CHANNEL:
        acc = acc * tl.load(ws_ptr + offs_wn * stride_wsn)[:, None]
    if not X_GROUPED:
        acc = acc * tl.load(xs_ptr + rows * stride_xsm, mask=m_ok, other=0.0)[None, :]

    mask = (offs_n < n_dim)[:, None] & m_ok[None, :]
    out_ptrs = out_ptr + rows[None, :] * stride_om + offs_n[:, None]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tile_part = part_ptr + rows[None, :] * n_dim + offs_n[:, None]  # split s at + s * m_dim * n_dim
        tl.store(tile_part + split * m_dim * n_dim, acc, mask=mask)
        # Every thread's partial is written before one thread releases the count (CUTLASS's semaphore order);
        # the last to arrive acquires it, so the other splits' partials are visible to its L2 reads.
        tl.debug_barrier()
        counter = count_ptr + tl.program_id(2) * tl.num_programs(0) + pid_n
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1:
            total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                total += tl.load(tile_part + s * m_dim * n_dim, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # zeroed for the next launch


def fp8_gemv(
    x_q: torch.Tensor,  # [M, K] float8_e4m3fn, unit stride along K
    x_s: torch.Tensor,  # [M, 1] float32 (per token) or [M, K / g] (per group of g: bk for a block weight)
    weight: torch.Tensor,  # [N, K] float8_e4m3fn
    weight_scale: torch.Tensor,  # [N] float32 (per channel) or [ceil(N / bn), K / bk] (block)
    block_size: tuple[int, int] | None = None,  # (bn, bk) of a block weight; None: per channel
    out_dtype: torch.dtype = torch.bfloat16,
    config: GemvConfig | None = None,
    exact: bool | None = None,  # fp16-widened dots (exact products, fp32 sums); default: for float32 outputs
    pdl: bool | None = None,  # launch with PDL (``radixlm.kernels.pdl``); default: where the device supports it
) -> torch.Tensor:  # [M, N] out_dtype
    """``(x_q * x_s) @ (weight * weight_scale)^T`` with fp32 accumulation across K tiles.  Any M works (a grid
    row per 16 rows, each re-reading the weight): the FP8 linears send M <= ``SMALL_M`` here, and float32
    models' rows of any M (cuBLAS's row-wise FP8 GEMM writes bf16 only).

    On Hopper with Triton 3.6, decode rows by weights of a quarter of the SMs to 8 a SM in 64-row tiles, in the
    per-channel form (online FP8's qkv, o, down and gate_up) go to the same product in Gluon (``gluon_gemv``:
    bit-equal at the same split, 3.6 % faster a batch-1 step on the narrow three, run S8), unless
    a launch ``config`` is given or listed for the shape.  Launched with PDL, the GEMV's launch and setup overlap
    the kernel that writes ``x_q``.  (Starting a bulk L2 prefetch of the weight before waiting was slower on an
    H200, run J1: 52.4 against 35.3 us at Llama-8B's gate_up, 9.8 against 9.1 at its o projection.)"""
    m, k = x_q.shape
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"FP8 GEMV: x has K={k}, the weight {tuple(weight.shape)}")
    if block_size is None:
        groups = x_s.shape[1] if x_s.dim() == 2 else 0
        if weight_scale.shape != (n,) or x_s.shape != (m, groups) or groups < 1 or k % groups:
            raise ValueError(f"per-channel FP8 GEMV of {m} x {k} by {n} x {k} needs scales ({m}, 1) or ({m}, K / "
                             f"group) and ({n},), got {tuple(x_s.shape)} and {tuple(weight_scale.shape)}")
    else:
        bn, bk = block_size
        if k % bk or weight_scale.shape != (triton.cdiv(n, bn), k // bk) or x_s.shape != (m, k // bk):
            raise ValueError(f"block FP8 GEMV of {m} x {k} by {tuple(weight.shape)} with blocks {block_size} needs "
                             f"K a multiple of {bk} and scales ({m}, {k // bk}) and {(triton.cdiv(n, bn), k // bk)}, "
                             f"got {tuple(x_s.shape)} and {tuple(weight_scale.shape)}")
    if (block_size is None and config is None and not exact and (n, k) not in config_overrides()
            and gluon_gemv.supported(x_q, x_s, weight, out_dtype, _num_sms(x_q.device))):
        return gluon_gemv.gluon_fp8_gemv(x_q, x_s, weight, weight_scale.contiguous(), out_dtype,
                                         pdl_launch_kwargs(x_q.device, pdl)["PDL"],
                                         gluon_gemv.launch_for(n, k, _num_sms(x_q.device)))
    if config is None:
        config = config_overrides().get((n, k)) or default_gemv_config(n, k, _num_sms(x_q.device))
    if config.preload not in (0, 1, 2):
        raise ValueError(f"FP8 GEMV: preload is 0, 1 or 2 weight tiles, got {config.preload}")
    x_grouped = x_s.shape[1] > 1 or block_size is not None
    if block_size is not None:
        group_n, group_k, block_k = *block_size, block_size[1]
    else:  # a K tile is one activation group when there are groups
        group_n, group_k = 1, k // x_s.shape[1]
        block_k = group_k if x_grouped else config.block_k
    if x_q.stride(1) != 1:
        x_q = x_q.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    weight_scale = weight_scale.contiguous()
    out = torch.empty((m, n), dtype=out_dtype, device=x_q.device)
    if m == 0:
        return out
    col_tiles, row_tiles = triton.cdiv(n, config.block_n), triton.cdiv(m, SMALL_M)
    split_k = config.split_k if col_tiles * row_tiles <= _COUNTERS else 1  # a counter per (column, row) tile
    if split_k > 1:
        partials = torch.empty((split_k, m, n), dtype=torch.float32, device=x_q.device)
        counters = _counters(x_q.device)
    else:
        partials = counters = out  # not read
    _fp8_gemv_kernel[(col_tiles, split_k, row_tiles)](
        x_q, x_s, weight, weight_scale, out, partials, counters, m, n, k, group_n, group_k,
        x_q.stride(0), x_s.stride(0), weight.stride(0), weight_scale.stride(0), out.stride(0),
        PER_CHANNEL=block_size is None, X_GROUPED=x_grouped, EXACT=out_dtype == torch.float32 if exact is None else exact,
        BLOCK_M=SMALL_M, BLOCK_N=config.block_n, BLOCK_K=block_k, SPLIT_K=split_k, PRELOAD=config.preload,
        num_warps=config.num_warps, num_stages=config.num_stages, **pdl_launch_kwargs(x_q.device, pdl),
    )
    return out
