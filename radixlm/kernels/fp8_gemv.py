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
output.  The counters are ``kernels.counters``' (zeroed, left zeroed by every launch: no memset, no second
kernel, CUDA graphs replay it as is).

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

from radixlm.kernels.counters import COUNTERS, arrival_counters
from radixlm.kernels.fp8 import FP8_MAX, SCALE_EPS
from radixlm.kernels.fp8_activation import SMALL_M  # rows at or below which the FP8 linears run this kernel
from radixlm.kernels.fused_ops import silu_mul
from radixlm.kernels.fused_quant import TL_DTYPES, quantize_e4m3
from radixlm.kernels.kv_store import KVStore, cache_value
from radixlm.kernels.launch_tables import read_launch_table
from radixlm.kernels.pdl import pdl_launch_kwargs, pdl_trigger, pdl_wait

SILU_MUL_QUANT: tl.constexpr = tl.constexpr(1)  # the kernel's epilogues (``EPILOGUE``; 0: none)
ROPE_STORE: tl.constexpr = tl.constexpr(2)
_COUNTERS = COUNTERS  # column tiles x row tiles a split launch may have (N up to 4M at 64 rows per tile)


class GemvConfig(NamedTuple):
    """Launch parameters: ``block_n`` weight rows per program (the MMA's M side: 64 or 128), ``block_k`` the
    per-channel K tile (block weights use their scale block's K), ``split_k`` programs per column tile,
    ``preload`` (0-2) weight tiles a program requests before its PDL wait, into registers (0 by default: not yet
    measured on a GPU; an L2 prefetch of the same bytes gained nothing end to end, run K1).  (Loading the weight
    tiles through a TMA descriptor instead was no faster on an H200, run J2.)"""

    block_n: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 4
    split_k: int = 1
    preload: int = 0


def default_gemv_config(n: int, k: int, num_sms: int) -> GemvConfig:
    """64-row tiles, 128-wide K tiles, 4 stages; split K until the launch has about two programs per SM, each
    split keeping >= 1024 of K.  ``bench/gpu/fp8_gemm.py --tune-gemv`` on an H200 (GPU run H2, Llama-3.1-8B and
    DeepSeek-V3 shapes, M 1 and 16, 32 configs): within 8 % of each shape's best (256-wide per-channel tiles, best
    on some shapes alone, lost up to 20 % with this split rule in run H3)."""
    tiles = triton.cdiv(n, 64)
    split = 1
    while split < 8 and tiles * split < 2 * num_sms and k // (2 * split) >= 1024:
        split *= 2
    return GemvConfig(64, 128, 4, 4, split)


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
    """The split launches' and epilogues' zeroed arrival counters on ``device``'s current stream."""
    return arrival_counters("fp8_gemv", device)


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
def _split_sum(tile_part, split_stride, mask, SPLIT_K: tl.constexpr):
    """The fp32 partials of one output tile added in split order (from zero, as the output is without a split),
    read from L2 (other programs wrote them)."""
    first = tl.load(tile_part, mask=mask, other=0.0, cache_modifier=".cg")
    if SPLIT_K == 1:
        return first
    total = tl.zeros_like(first) + first
    for s in tl.static_range(1, SPLIT_K):
        total += tl.load(tile_part + s * split_stride, mask=mask, other=0.0, cache_modifier=".cg")
    return total


@triton.jit
def _silu_mul_quant_epilogue(part_ptr, q_ptr, s_ptr, group, rows, m_ok, m_dim, n_dim, scale_eps, fp8_max,
                             OUT_DTYPE: tl.constexpr, SILU_GROUP: tl.constexpr, SPLIT_K: tl.constexpr):
    """Quantization group ``group`` of ``silu(gate) * up`` for the block's rows: the gate and up outputs summed
    over the splits and rounded to the output dtype (what the GEMV would write), then SiLU-mul and the group's
    E4M3 quantization exactly as ``fused_quant.silu_and_mul_quant_fp8`` computes them from those outputs."""
    d = n_dim // 2
    cols = group * SILU_GROUP + tl.arange(0, SILU_GROUP)  # [SILU_GROUP] of the d outputs
    mask = (cols < d)[:, None] & m_ok[None, :]
    gate_part = part_ptr + rows[None, :] * n_dim + cols[:, None]  # [SILU_GROUP, BLOCK_M]
    gate = _split_sum(gate_part, m_dim * n_dim, mask, SPLIT_K).to(OUT_DTYPE)
    up = _split_sum(gate_part + d, m_dim * n_dim, mask, SPLIT_K).to(OUT_DTYPE)
    h = silu_mul(gate, up).to(OUT_DTYPE).to(tl.float32)  # [SILU_GROUP, BLOCK_M]
    scales = tl.math.div_rn(tl.maximum(tl.max(tl.abs(h), axis=0), scale_eps), fp8_max)  # [BLOCK_M]
    tl.store(q_ptr + rows[None, :] * d + cols[:, None],
             quantize_e4m3(h, scales[None, :], fp8_max).to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + rows * (d // SILU_GROUP) + group, scales, mask=m_ok)


@triton.jit
def _rope_store_epilogue(part_ptr, q_ptr, head, rows, m_ok, m_dim, n_dim, pos_ptr, cos_sin_ptr, cos_sin_stride,
                         loc_ptr, k_buf_ptr, v_buf_ptr, k_scale_ptr, v_scale_ptr, num_q_heads, num_kv_heads,
                         kv_fp8_max, OUT_DTYPE: tl.constexpr, HEAD_DIM: tl.constexpr, SPLIT_K: tl.constexpr,
                         KV_QUANT: tl.constexpr, KV_E4M3: tl.constexpr):
    """Head ``head`` of the q ‖ k ‖ v output for the block's rows: summed over the splits and rounded to the
    output dtype (what the GEMV would write), then as ``fused_ops.apply_rotary`` with a ``KVStore`` treats it:
    a q head rotated (NeoX pairs, the same roundings) into ``q_ptr`` [M, num_q_heads * HEAD_DIM], a k head
    rotated and a v head as is into the cache slots ``loc`` (FP8: ``kv_store.cache_value``)."""
    half: tl.constexpr = HEAD_DIM // 2
    dims = tl.arange(0, half)
    mask = (dims < half)[:, None] & m_ok[None, :]  # [half, BLOCK_M]
    first = part_ptr + rows[None, :] * n_dim + head * HEAD_DIM + dims[:, None]  # the head's first half
    x1 = _split_sum(first, m_dim * n_dim, mask, SPLIT_K).to(OUT_DTYPE)
    x2 = _split_sum(first + half, m_dim * n_dim, mask, SPLIT_K).to(OUT_DTYPE)
    if head < num_q_heads + num_kv_heads:  # q or k: rotated
        pos = tl.load(pos_ptr + rows, mask=m_ok, other=0).to(tl.int64)
        angles = cos_sin_ptr + pos[None, :] * cos_sin_stride + dims[:, None]  # [half, BLOCK_M]
        cos = tl.load(angles, mask=mask, other=0.0).to(OUT_DTYPE).to(tl.float32)
        sin = tl.load(angles + half, mask=mask, other=0.0).to(OUT_DTYPE).to(tl.float32)
        x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
        out1 = ((x1f * cos).to(OUT_DTYPE).to(tl.float32) - (x2f * sin).to(OUT_DTYPE).to(tl.float32)).to(OUT_DTYPE)
        out2 = ((x2f * cos).to(OUT_DTYPE).to(tl.float32) + (x1f * sin).to(OUT_DTYPE).to(tl.float32)).to(OUT_DTYPE)
    else:
        out1, out2 = x1, x2
    if head < num_q_heads:
        q_dst = q_ptr + rows[None, :] * (num_q_heads * HEAD_DIM) + head * HEAD_DIM + dims[:, None]
        tl.store(q_dst, out1, mask=mask)
        tl.store(q_dst + half, out2, mask=mask)
    else:
        slot = tl.load(loc_ptr + rows, mask=m_ok, other=0).to(tl.int64)
        if head < num_q_heads + num_kv_heads:
            buf_ptr, scale_ptr, kv_head = k_buf_ptr, k_scale_ptr, head - num_q_heads
        else:
            buf_ptr, scale_ptr, kv_head = v_buf_ptr, v_scale_ptr, head - num_q_heads - num_kv_heads
        dst = buf_ptr + slot[None, :] * (num_kv_heads * HEAD_DIM) + kv_head * HEAD_DIM + dims[:, None]
        tl.store(dst, cache_value(out1, scale_ptr, kv_fp8_max, KV_QUANT, KV_E4M3).to(k_buf_ptr.dtype.element_ty),
                 mask=mask)
        tl.store(dst + half, cache_value(out2, scale_ptr, kv_fp8_max, KV_QUANT, KV_E4M3).to(
            k_buf_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fp8_gemv_kernel(
    xq_ptr, xs_ptr, w_ptr, ws_ptr, out_ptr, part_ptr, count_ptr, scale_out_ptr,
    pos_ptr, cos_sin_ptr, loc_ptr, k_buf_ptr, v_buf_ptr, k_scale_ptr, v_scale_ptr,
    m_dim, n_dim, k_dim, group_n, group_k, scale_eps, fp8_max, cos_sin_stride, num_q_heads, num_kv_heads,
    kv_fp8_max, stride_xm, stride_xsm, stride_wn, stride_wsn, stride_om,
    PER_CHANNEL: tl.constexpr, X_GROUPED: tl.constexpr, EXACT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, PRELOAD: tl.constexpr,
    EPILOGUE: tl.constexpr, GROUP: tl.constexpr, OUT_DTYPE: tl.constexpr, KV_QUANT: tl.constexpr,
    KV_E4M3: tl.constexpr, PDL: tl.constexpr,
):
    # EPILOGUE: 0 the product; SILU_MUL_QUANT: SiLU-mul of gate ‖ up quantized per GROUP channels; ROPE_STORE:
    # q ‖ k ‖ v heads of GROUP (= head_dim) rows, rotated, K and V stored in the cache.
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
    if SPLIT_K == 1 and EPILOGUE == 0:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tile_part = part_ptr + rows[None, :] * n_dim + offs_n[:, None]  # split s at + s * m_dim * n_dim
        tl.store(tile_part + split * m_dim * n_dim, acc, mask=mask)
        # Every thread's partial is written before one thread releases the count (CUTLASS's semaphore order);
        # the last to arrive acquires it, so the other programs' partials are visible to its L2 reads.  A count
        # covers a column tile's splits, or an epilogue's group: a quantization group's gate and up tiles, a head.
        tl.debug_barrier()
        if EPILOGUE == 0:
            counter = count_ptr + tl.program_id(2) * tl.num_programs(0) + pid_n
            arrivals = SPLIT_K
        elif EPILOGUE == SILU_MUL_QUANT:
            group = (pid_n % (n_dim // 2 // BLOCK_N)) // (GROUP // BLOCK_N)
            counter = count_ptr + tl.program_id(2) * (n_dim // 2 // GROUP) + group
            arrivals = 2 * (GROUP // BLOCK_N) * SPLIT_K
        else:
            group = pid_n // (GROUP // BLOCK_N)  # the head
            counter = count_ptr + tl.program_id(2) * (n_dim // GROUP) + group
            arrivals = (GROUP // BLOCK_N) * SPLIT_K
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == arrivals - 1:
            if EPILOGUE == 0:
                total = _split_sum(tile_part, m_dim * n_dim, mask, SPLIT_K)
                tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=mask)
            elif EPILOGUE == SILU_MUL_QUANT:
                _silu_mul_quant_epilogue(part_ptr, out_ptr, scale_out_ptr, group, rows, m_ok, m_dim, n_dim,
                                         scale_eps, fp8_max, OUT_DTYPE, GROUP, SPLIT_K)
            else:
                _rope_store_epilogue(part_ptr, out_ptr, group, rows, m_ok, m_dim, n_dim, pos_ptr, cos_sin_ptr,
                                     cos_sin_stride, loc_ptr, k_buf_ptr, v_buf_ptr, k_scale_ptr, v_scale_ptr,
                                     num_q_heads, num_kv_heads, kv_fp8_max, OUT_DTYPE, GROUP, SPLIT_K, KV_QUANT,
                                     KV_E4M3)
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

    Launched with PDL, the GEMV's launch and setup overlap the kernel that writes ``x_q``.  (Starting a bulk L2
    prefetch of the weight before waiting was slower on an H200, run J1: 52.4 against 35.3 us at Llama-8B's
    gate_up, 9.8 against 9.1 at its o projection.)"""
    m, n = x_q.shape[0], weight.shape[0]
    config = _checked_config(x_q, x_s, weight, weight_scale, block_size, config)
    out = torch.empty((m, n), dtype=out_dtype, device=x_q.device)
    if m:
        _launch(x_q, x_s, weight, weight_scale, block_size, out, config, exact, pdl, out_dtype)
    return out


def silu_mul_fits(n: int, k: int, group: int | None, device: torch.device) -> bool:
    """Whether ``fp8_gemv_silu_mul_quant`` runs a gate ‖ up weight of ``n`` rows and ``k`` columns for a next
    layer that takes ``group``-channel groups: each half a whole number of groups, the groups whole tiles."""
    if group is None or n % 2 or (n // 2) % group:
        return False
    config = config_overrides().get((n, k)) or default_gemv_config(n, k, _num_sms(device))
    return group % config.block_n == 0 and triton.next_power_of_2(group) == group


def fp8_gemv_silu_mul_quant(
    x_q: torch.Tensor,  # [M, K] float8_e4m3fn
    x_s: torch.Tensor,  # as ``fp8_gemv``'s
    weight: torch.Tensor,  # [2 * d, K] float8_e4m3fn: the gate rows, then the up rows
    weight_scale: torch.Tensor,
    group: int,  # channels per scale of the quantized output (the next FP8 linear's ``input_quant``)
    block_size: tuple[int, int] | None = None,
    out_dtype: torch.dtype = torch.bfloat16,  # the dtype the projection's output would have
    config: GemvConfig | None = None,
    pdl: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # [M, d] float8_e4m3fn, [M, d / group] float32
    """``silu(gate) * up`` of the projection ``fp8_gemv`` computes, quantized per token per ``group`` channels
    in the GEMV's epilogue (``silu_mul_fits`` says where): every program leaves its fp32 partial in scratch, and
    the last of a group's gate and up programs (and K splits) to arrive sums them, rounds them to ``out_dtype``,
    applies SiLU-mul and writes the group's E4M3 values and scale.  The same bits as ``fp8_gemv`` followed by
    ``fused_quant.silu_and_mul_quant_fp8``, without the second launch and the projection's output round trip."""
    m, n = x_q.shape[0], weight.shape[0]
    config = _checked_config(x_q, x_s, weight, weight_scale, block_size, config)
    if not silu_mul_fits(n, x_q.shape[1], group, x_q.device) or group % config.block_n:
        raise ValueError(f"FP8 GEMV SiLU-mul: {n} gate/up rows in groups of {group} at {config.block_n} rows a "
                         f"program do not fit (silu_mul_fits)")
    q = torch.empty((m, n // 2), dtype=torch.float8_e4m3fn, device=x_q.device)
    scale = torch.empty((m, n // 2 // group), dtype=torch.float32, device=x_q.device)
    if m:
        _launch(x_q, x_s, weight, weight_scale, block_size, q, config, None, pdl, out_dtype, SILU_MUL_QUANT.value,
                group, scale)
    return q, scale


def rope_store_fits(n: int, k: int, head_dim: int, device: torch.device) -> bool:
    """Whether ``fp8_gemv_rope_store`` runs a q ‖ k ‖ v weight of ``n`` rows and ``k`` columns: whole heads of
    a power-of-two ``head_dim``, each whole tiles."""
    config = config_overrides().get((n, k)) or default_gemv_config(n, k, _num_sms(device))
    return (triton.next_power_of_2(head_dim) == head_dim >= 16 and n % head_dim == 0
            and head_dim % config.block_n == 0)


def fp8_gemv_rope_store(
    x_q: torch.Tensor,  # [M, K] float8_e4m3fn
    x_s: torch.Tensor,  # as ``fp8_gemv``'s
    weight: torch.Tensor,  # [(q_heads + 2 * kv_heads) * head_dim, K] float8_e4m3fn: q, then k, then v rows
    weight_scale: torch.Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    positions: torch.Tensor,  # [M] rows of ``cos_sin``
    cos_sin: torch.Tensor,  # [*, head_dim] float32: each row's cos then sin (``RotaryEmbedding``'s table)
    kv_out: KVStore,  # the layer's cache slots for the M tokens
    block_size: tuple[int, int] | None = None,
    out_dtype: torch.dtype = torch.bfloat16,  # the dtype the projection's output would have
    config: GemvConfig | None = None,
    pdl: bool | None = None,
) -> torch.Tensor:  # [M, q_heads * head_dim] out_dtype: q, rotated
    """The qkv projection ``fp8_gemv`` computes, with NeoX RoPE over whole heads and the K/V store in its
    epilogue (``rope_store_fits`` says where): every program leaves its fp32 partial in scratch, and the last of
    a head's programs (and K splits) to arrive sums them, rounds them to ``out_dtype`` and rotates a q head into
    the result, or stores a k head rotated and a v head as is at ``kv_out``'s slots.  The same bits as
    ``fp8_gemv`` followed by ``fused_ops.apply_rotary(..., v, kv_out)``, one launch and the projection's output
    round trip fewer."""
    m, n = x_q.shape[0], weight.shape[0]
    config = _checked_config(x_q, x_s, weight, weight_scale, block_size, config)
    heads = num_q_heads + 2 * num_kv_heads
    head_dim = n // heads if n % heads == 0 else 0
    if (not head_dim or not rope_store_fits(n, x_q.shape[1], head_dim, x_q.device) or head_dim % config.block_n
            or cos_sin.shape[-1] != head_dim or cos_sin.stride(-1) != 1 or positions.shape != (m,)):
        raise ValueError(f"FP8 GEMV RoPE: {n} rows as {num_q_heads} + 2 x {num_kv_heads} heads with a "
                         f"{tuple(cos_sin.shape)} table at {config.block_n} rows a program do not fit "
                         f"(rope_store_fits)")
    k_buf, v_buf = kv_out.k_buf, kv_out.v_buf
    if (not k_buf.is_contiguous() or not v_buf.is_contiguous() or k_buf.dtype != v_buf.dtype
            or k_buf.shape[1:] != (num_kv_heads, head_dim) or v_buf.shape[1:] != (num_kv_heads, head_dim)
            or kv_out.loc.shape != (m,) or (kv_out.quantized and (kv_out.k_scale is None or kv_out.v_scale is None))):
        raise ValueError(f"FP8 GEMV RoPE: K/V buffers {tuple(k_buf.shape)} / {tuple(v_buf.shape)} and slots "
                         f"{tuple(kv_out.loc.shape)} do not fit {m} tokens of {num_kv_heads} heads x {head_dim}")
    q = torch.empty((m, num_q_heads * head_dim), dtype=out_dtype, device=x_q.device)
    if m:
        _launch(x_q, x_s, weight, weight_scale, block_size, q, config, None, pdl, out_dtype, ROPE_STORE.value,
                head_dim, None, _RopeStore(positions, cos_sin, kv_out, num_q_heads, num_kv_heads))
    return q


def _checked_config(x_q: torch.Tensor, x_s: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                    block_size: tuple[int, int] | None, config: GemvConfig | None) -> GemvConfig:
    """The launch config of this shape (``config``, a table's, or the default), after checking the operands."""
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
    if config is None:
        config = config_overrides().get((n, k)) or default_gemv_config(n, k, _num_sms(x_q.device))
    if config.preload not in (0, 1, 2):
        raise ValueError(f"FP8 GEMV: preload is 0, 1 or 2 weight tiles, got {config.preload}")
    return config


class _RopeStore(NamedTuple):
    """The ROPE_STORE epilogue's operands (``fp8_gemv_rope_store``)."""

    positions: torch.Tensor
    cos_sin: torch.Tensor
    kv_out: KVStore
    num_q_heads: int
    num_kv_heads: int


def _launch(x_q: torch.Tensor, x_s: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
            block_size: tuple[int, int] | None, out: torch.Tensor, config: GemvConfig, exact: bool | None,
            pdl: bool | None, out_dtype: torch.dtype, epilogue: int = 0, group: int = 0,
            scale_out: torch.Tensor | None = None, rope: _RopeStore | None = None) -> None:
    """One GEMV launch into ``out``: [M, N] (no epilogue); SILU_MUL_QUANT [M, N / 2] E4M3 and ``scale_out``
    [M, N / 2 / group]; ROPE_STORE q [M, q heads * group] (K and V into ``rope.kv_out``).  ``out_dtype``: the
    projection's."""
    m, k = x_q.shape
    n = weight.shape[0]
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
    col_tiles, row_tiles = triton.cdiv(n, config.block_n), triton.cdiv(m, SMALL_M)
    groups = {0: col_tiles, SILU_MUL_QUANT.value: n // 2 // max(group, 1), ROPE_STORE.value: n // max(group, 1)}
    counts = row_tiles * groups[epilogue]
    if epilogue and counts > _COUNTERS:
        raise ValueError(f"FP8 GEMV epilogue: {counts} groups exceed the {_COUNTERS} counters")
    split_k = config.split_k if counts <= _COUNTERS else 1  # a counter per (column, row) tile
    if split_k > 1 or epilogue:
        partials = torch.empty((split_k, m, n), dtype=torch.float32, device=x_q.device)
        counters = _counters(x_q.device)
    else:
        partials = counters = out  # not read
    kv_quant, kv_e4m3, kv_fp8_max = False, False, 0.0
    if rope is None:
        pos = cos_sin = loc = k_buf = v_buf = k_scale = v_scale = out  # not read
        cos_sin_stride = num_q_heads = num_kv_heads = 0
    else:
        kv = rope.kv_out
        pos, cos_sin, loc, k_buf, v_buf = rope.positions, rope.cos_sin, kv.loc, kv.k_buf, kv.v_buf
        k_scale, v_scale = (kv.k_scale, kv.v_scale) if kv.quantized else (k_buf, k_buf)
        kv_quant, kv_e4m3 = kv.quantized, k_buf.dtype == torch.float8_e4m3fn
        kv_fp8_max = torch.finfo(k_buf.dtype).max if kv.quantized else 0.0
        cos_sin_stride, num_q_heads, num_kv_heads = cos_sin.stride(0), rope.num_q_heads, rope.num_kv_heads
    _fp8_gemv_kernel[(col_tiles, split_k, row_tiles)](
        x_q, x_s, weight, weight_scale, out, partials, counters, out if scale_out is None else scale_out,
        pos, cos_sin, loc, k_buf, v_buf, k_scale, v_scale,
        m, n, k, group_n, group_k, SCALE_EPS, FP8_MAX, cos_sin_stride, num_q_heads, num_kv_heads, kv_fp8_max,
        x_q.stride(0), x_s.stride(0), weight.stride(0), weight_scale.stride(0), out.stride(0),
        PER_CHANNEL=block_size is None, X_GROUPED=x_grouped,
        EXACT=out_dtype == torch.float32 if exact is None else exact,
        BLOCK_M=SMALL_M, BLOCK_N=config.block_n, BLOCK_K=block_k, SPLIT_K=split_k, PRELOAD=config.preload,
        EPILOGUE=epilogue, GROUP=group, OUT_DTYPE=TL_DTYPES[out_dtype], KV_QUANT=kv_quant, KV_E4M3=kv_e4m3,
        num_warps=config.num_warps, num_stages=config.num_stages, **pdl_launch_kwargs(x_q.device, pdl),
    )
