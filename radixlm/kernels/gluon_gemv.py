"""The narrow decode projections' FP8 GEMV in Gluon (Triton's explicit dialect), for Hopper with Triton 3.6.

``fp8_gemv``'s Triton kernel loads each weight tile into registers and lets the compiler pipeline the loop.  This
one requests the weight's K tiles by TMA into a ring of shared-memory slots (``stages`` slots of ``sub`` 128-wide
tiles, one mbarrier a slot), refilling a slot as soon as its wgmma is done, the first ``preload`` slots before
the PDL wait (the weight does not depend on the kernel before); the activation group scales sit in shared memory.
Llama-3.1-8B's projections take it (qkv, o, down: 64-96 tiles of 64 rows, split K; gate_up: 224 tiles of 128
rows): run S7, online FP8 at batch 1, 2.80 -> 2.70 ms a step with the first version on the narrow three (no K
split, a producer warp); S7's table found the split launch of ``Launch`` faster still, and run T3 gate_up's
``WIDE_LAUNCH`` 0.01-0.03 ms a step faster than the Triton kernel.  (Runs S1-T4 in docs/benchmarks.md: deeper
rings, more tiles a slot, a producer warp, one program per SM over two projections, launches inside the step.)

The semantics are ``fp8_gemv``'s for online FP8's decode rows: per-channel E4M3 weight ``[N, K]`` with scales
``[N]``, activations ``[M <= 16, K]`` in E4M3 with one scale per token per 128 channels, ``out^T = W x^T`` on the
wgmma (weight rows on its 64-row side, tokens padded to 16 by the TMA's zero fill), each K tile's dot from zero
scaled by its activation group scale into an fp32 accumulator, the weight scale at the end, split partials added
in split order: the same products in the same order as ``fp8_gemv``'s kernel at the same split, so the same bits.

Gluon's API changes between Triton releases (3.9 renamed the TMA copies), so the kernel is built only where it was
measured: ``supported()`` is False unless Triton is 3.6.x, the device is sm_90 and ``RADIXLM_DISABLE_GLUON`` is
unset; everything else keeps the Triton kernel.  CPU CI cannot compile it (its Triton is another release); the GPU
runs ``tests/unit/test_gluon_gemv.py``.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton

from radixlm.kernels.launch_tables import read_launch_table

try:
    if not triton.__version__.startswith("3.6."):
        raise ImportError(f"the Gluon GEMV is written for Triton 3.6, not {triton.__version__}")
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:
    gluon = None

BLOCK_N = 64  # weight rows a program (the wgmma's M side)
BLOCK_K = 128  # a K tile: one activation group
BLOCK_M = 16  # tokens a program, padded (the wgmma's N side)


class Launch(NamedTuple):
    """A launch: ``block_n`` weight rows a program, a ring of ``stages`` slots of ``sub`` 128-wide K tiles, K split
    over ``split_k`` programs (the last to finish a column tile adds the partials in split order, as
    ``fp8_gemv`` does), ``preload`` slots' weights requested before the PDL wait.  The default, for narrow weights,
    is run S7's best at Llama-3.1-8B's qkv, o and down (quantizer + GEMV with PDL, us): o 8.11 against the Triton
    kernel's 9.21, qkv 10.32 against 11.07, down 19.83 against 21.59.  (Run T1's sweep timed 3 slots with split 8
    at 7.65 us on o alone; run T3 found the two equal inside the step.)"""

    block_n: int = 64
    stages: int = 4
    sub: int = 1
    split_k: int = 4
    preload: int = 2


# Weights of 2-8 64-row tiles a SM (Llama-3.1-8B's gate_up: 448 on 132 SMs) fill the GPU without a split: 128
# rows a program, 3 slots.  Run T1: gate_up's quantizer + GEMV 34.28 us against the Triton kernel's 34.31 alone;
# run T3: a batch-1 step 0.01-0.03 ms shorter with it.
WIDE_LAUNCH = Launch(128, 3, 1, 1, 2)


@functools.cache
def launch_overrides() -> dict[tuple[int, int], Launch]:
    """Per-shape launches from the JSON file named by ``RADIXLM_GLUON_LAUNCHES`` (``{"N,K": [block_n, stages,
    sub, split_k, preload], ...}``), read once: a listed shape takes this kernel at that launch whatever its
    width (tuning runs time a step with them)."""
    return {(int(n), int(k)): Launch(*values) for (n, k), values in read_launch_table("RADIXLM_GLUON_LAUNCHES").items()}


def launch_for(n: int, k: int, num_sms: int) -> Launch:
    """The launch of an ``[n, k]`` weight that ``applies``: the table's, else ``Launch()`` for a narrow weight
    (under two 64-row tiles a SM) and ``WIDE_LAUNCH`` for a wide one."""
    listed = launch_overrides().get((n, k))
    if listed is not None:
        return listed
    return Launch() if triton.cdiv(n, BLOCK_N) < 2 * num_sms else WIDE_LAUNCH


@functools.cache
def _enabled(device: torch.device) -> bool:
    return (gluon is not None and device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)
            and os.environ.get("RADIXLM_DISABLE_GLUON", "0") in ("", "0"))


def applies(n: int, k: int, m: int, num_sms: int) -> bool:
    """Whether a GEMV of ``m`` tokens by an ``[n, k]`` weight goes to this kernel (on a device where it is
    enabled): decode rows, K a whole number of activation groups, and a weight of a quarter of the SMs to 8 a SM
    in 64-row tiles (the widths runs S5-T3 measured: 64-96 tiles on 132 SMs, and gate_up's 448; an FP8 LM head's
    2,004 keep the Triton kernel), or one ``launch_overrides`` lists."""
    tiles = triton.cdiv(n, BLOCK_N)
    measured = num_sms // 4 <= tiles < 8 * num_sms or (n, k) in launch_overrides()
    return 1 <= m <= BLOCK_M and k % BLOCK_K == 0 and k >= 2048 and measured


def supported(x_q: torch.Tensor, x_s: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype,
              num_sms: int) -> bool:
    """``applies`` for these operands of ``fp8_gemv``'s per-channel form, on an enabled device, with 128-group
    activation scales and a 16-bit output (float32 outputs keep the Triton kernel's exact fp16 dots)."""
    m, k = x_q.shape
    return (_enabled(x_q.device) and out_dtype in (torch.bfloat16, torch.float16) and x_s.dim() == 2
            and x_s.shape == (m, k // BLOCK_K) and applies(weight.shape[0], k, m, num_sms)
            and weight.stride(1) == 1 and x_q.stride(1) == 1 and weight.data_ptr() % 16 == 0
            and x_q.data_ptr() % 16 == 0 and (weight.stride(0) * weight.element_size()) % 16 == 0
            and (x_q.stride(0) * x_q.element_size()) % 16 == 0)


if gluon is not None:

    @gluon.jit
    def _pdl_wait(PDL: gl.constexpr):
        if PDL:
            gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False,
                                      pack=1)

    @gluon.jit
    def _pdl_trigger(PDL: gl.constexpr):
        if PDL:
            gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32,
                                      is_pure=False, pack=1)

    @gluon.jit
    def _gemv_kernel(w_desc, x_desc, xs_ptr, ws_ptr, out_ptr, part_ptr, count_ptr,
                     m_dim, n_dim, k_dim, stride_xsm, stride_om,
                     BLOCK_M: gl.constexpr, STAGES: gl.constexpr, SUB: gl.constexpr, SPLIT_K: gl.constexpr,
                     PRELOAD: gl.constexpr, MAX_TILES: gl.constexpr, PDL: gl.constexpr, num_warps: gl.constexpr):
        BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = w_desc.block_type.shape[1]  # one activation group: a K tile
        pid_n = gl.program_id(0)
        split = gl.program_id(1)
        pid_m = gl.program_id(2)
        off_n = pid_n * BLOCK_N
        off_m = pid_m * BLOCK_M
        k_tiles = gl.cdiv(k_dim, BLOCK_K)
        per_split = gl.cdiv(k_tiles, SPLIT_K)
        t0 = split * per_split
        n_tiles = gl.minimum(per_split, k_tiles - t0)
        n_stages = gl.cdiv(n_tiles, SUB)  # a ring slot holds SUB K tiles

        w_smem = gl.allocate_shared_memory(w_desc.dtype, [STAGES * SUB, BLOCK_N, BLOCK_K], w_desc.layout)
        x_smem = gl.allocate_shared_memory(x_desc.dtype, [STAGES * SUB, BLOCK_M, BLOCK_K], x_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for slot in gl.static_range(STAGES):
            mbarrier.init(bars.index(slot), count=1)
        # A slot's SUB tiles are all copied (past the split's range: zero scales below, or the TMA's zero fill past K),
        # so that its barrier always expects the same bytes.
        slot_bytes: gl.constexpr = SUB * (w_desc.block_type.nbytes + x_desc.block_type.nbytes)

        # The weight does not depend on the kernel before: the first PRELOAD slots' weight tiles are requested before
        # the PDL wait, the activations (written by the kernel before) only after it.  A slot's barrier expects both.
        for slot in gl.static_range(STAGES):
            live = slot < n_stages
            mbarrier.expect(bars.index(slot), slot_bytes, pred=live)
            if slot < PRELOAD:
                for j in gl.static_range(SUB):
                    tma.async_copy_global_to_shared(w_desc, [off_n, (t0 + slot * SUB + j) * BLOCK_K], bars.index(slot),
                                                    w_smem.index(slot * SUB + j), pred=live)
        _pdl_wait(PDL)
        for slot in gl.static_range(STAGES):
            live = slot < n_stages
            for j in gl.static_range(SUB):
                if slot >= PRELOAD:
                    tma.async_copy_global_to_shared(w_desc, [off_n, (t0 + slot * SUB + j) * BLOCK_K], bars.index(slot),
                                                    w_smem.index(slot * SUB + j), pred=live)
                tma.async_copy_global_to_shared(x_desc, [off_m, (t0 + slot * SUB + j) * BLOCK_K], bars.index(slot),
                                                x_smem.index(slot * SUB + j), pred=live)

        # The program's activation group scales go to shared memory once: loaded in the loop, each one's global
        # latency stalled every K tile (run S1: 27 GB/s a program).  Zero past the split's range.
        scale_layout: gl.constexpr = gl.BlockedLayout([1, 1], [32 // BLOCK_M, BLOCK_M], [num_warps, 1], [1, 0])
        tiles = gl.arange(0, MAX_TILES, layout=gl.SliceLayout(1, scale_layout))
        tokens = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, scale_layout))
        scale_mask = gl.expand_dims(tiles < n_tiles, 1) & gl.expand_dims(tokens < m_dim, 0)
        scales = gl.load(xs_ptr + gl.expand_dims(tokens, 0) * stride_xsm + t0 + gl.expand_dims(tiles, 1),
                         mask=scale_mask, other=0.0)  # [MAX_TILES, BLOCK_M]
        flat_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
        xs_smem = gl.allocate_shared_memory(gl.float32, [MAX_TILES * BLOCK_M], flat_layout,
                                            gl.reshape(scales, [MAX_TILES * BLOCK_M]))
        xs_smem = xs_smem._reinterpret(gl.float32, [MAX_TILES, BLOCK_M], flat_layout)  # a row per K tile
        gl.thread_barrier()

        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                             instr_shape=[16, BLOCK_M, 32])
        rows = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, acc_layout))  # tokens
        cols = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, acc_layout))  # weight rows (outputs)
        row_ok = rows < m_dim
        acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, acc_layout)
        zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, acc_layout)
        for i in range(n_stages):
            s = i % STAGES
            mbarrier.wait(bars.index(s), (i // STAGES) & 1)
            for j in gl.static_range(SUB):
                part = warpgroup_mma(w_smem.index(s * SUB + j), x_smem.index(s * SUB + j).permute((1, 0)), zero,
                                     use_acc=False, is_async=True)
                part = warpgroup_mma_wait(num_outstanding=0,
                                          deps=(part, w_smem.index(s * SUB + j), x_smem.index(s * SUB + j)))[0]
                x_s = xs_smem.index(i * SUB + j).load(gl.SliceLayout(0, acc_layout))  # [BLOCK_M] the tile's scales
                acc += part * gl.expand_dims(x_s, 0)
            # The slot is free again: request the stage STAGES ahead into it.
            ahead = i + STAGES
            live = ahead < n_stages
            mbarrier.expect(bars.index(s), slot_bytes, pred=live)
            for j in gl.static_range(SUB):
                tma.async_copy_global_to_shared(w_desc, [off_n, (t0 + ahead * SUB + j) * BLOCK_K], bars.index(s),
                                                w_smem.index(s * SUB + j), pred=live)
                tma.async_copy_global_to_shared(x_desc, [off_m, (t0 + ahead * SUB + j) * BLOCK_K], bars.index(s),
                                                x_smem.index(s * SUB + j), pred=live)
        _pdl_trigger(PDL)
        for slot in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(slot))

        col_ok = cols < n_dim
        acc = acc * gl.expand_dims(gl.load(ws_ptr + cols, mask=col_ok, other=0.0), 1)
        mask = gl.expand_dims(col_ok, 1) & gl.expand_dims(row_ok, 0)
        out_ptrs = out_ptr + gl.expand_dims(rows, 0) * stride_om + gl.expand_dims(cols, 1)
        if SPLIT_K == 1:
            gl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tile_part = part_ptr + gl.expand_dims(rows, 0) * n_dim + gl.expand_dims(cols, 1)
            gl.store(tile_part + split * m_dim * n_dim, acc, mask=mask)
            gl.thread_barrier()
            counter = count_ptr + pid_m * gl.num_programs(0) + pid_n
            if gl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1:
                total = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, acc_layout)
                for t in gl.static_range(SPLIT_K):
                    total += gl.load(tile_part + t * m_dim * n_dim, mask=mask, other=0.0, cache_modifier=".cg")
                gl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=mask)
                gl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")


def gluon_fp8_gemv(
    x_q: torch.Tensor,  # [M <= 16, K] float8_e4m3fn
    x_s: torch.Tensor,  # [M, K / 128] float32
    weight: torch.Tensor,  # [N, K] float8_e4m3fn
    weight_scale: torch.Tensor,  # [N] float32
    out_dtype: torch.dtype,
    pdl: bool,
    launch: Launch = Launch(),
) -> torch.Tensor:  # [M, N] out_dtype
    """``(x_q * x_s) @ (weight * weight_scale)^T`` (see the module docstring); callers check ``supported``."""
    from radixlm.kernels.fp8_gemv import _counters  # the split launches' zeroed counters, shared with fp8_gemv

    m, k = x_q.shape
    n = weight.shape[0]
    w_layout = gl.NVMMASharedLayout.get_default_for([launch.block_n, BLOCK_K], gl.float8e4nv)
    x_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], gl.float8e4nv)
    w_desc = TensorDescriptor(weight, [n, k], [weight.stride(0), 1], [launch.block_n, BLOCK_K], w_layout)
    x_desc = TensorDescriptor(x_q, [m, k], [x_q.stride(0), 1], [BLOCK_M, BLOCK_K], x_layout)
    out = torch.empty((m, n), dtype=out_dtype, device=x_q.device)
    split = launch.split_k
    partials = torch.empty((split, m, n), dtype=torch.float32, device=x_q.device) if split > 1 else out
    counters = _counters(x_q.device) if split > 1 else out
    per_split = triton.cdiv(k // BLOCK_K, split)
    _gemv_kernel[(triton.cdiv(n, launch.block_n), split, 1)](
        w_desc, x_desc, x_s, weight_scale, out, partials, counters, m, n, k, x_s.stride(0), out.stride(0),
        BLOCK_M=BLOCK_M, STAGES=launch.stages, SUB=launch.sub, SPLIT_K=split,
        PRELOAD=min(launch.preload, launch.stages),
        MAX_TILES=triton.next_power_of_2(triton.cdiv(per_split, launch.sub) * launch.sub), PDL=pdl, num_warps=4,
        **({"launch_pdl": True} if pdl else {}))
    return out
