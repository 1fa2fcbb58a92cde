"""The narrow decode projections' FP8 GEMV in Gluon (Triton's explicit dialect), for Hopper with Triton 3.6.

``fp8_gemv`` streams a narrow weight (Llama-3.1-8B's qkv, o and down: 64-96 tiles of 64 rows) with K split over
2-4 programs a column tile, because its Triton loop needs about two programs per SM to keep enough bytes in
flight; the split costs a reduction tail (GPU run P3: 0.1 ms of a 2.76 ms batch-1 step).  This kernel keeps one
program per 64 weight rows and no split: a producer warp requests the weight's K tiles by TMA into a ring of
shared-memory slots (``STAGES`` slots of ``SUB`` 128-wide tiles, one mbarrier each way), the first slots before
the PDL wait (the weight does not depend on the kernel before), while a wgmma warp group consumes them
(warp specialization).  Run S6 (Llama-3.1-8B, online FP8, batch 1): 2.76 -> 2.69 ms a step with it on those
three projections.

The semantics are ``fp8_gemv``'s for online FP8's decode rows: per-channel E4M3 weight ``[N, K]`` with scales
``[N]``, activations ``[M <= 16, K]`` in E4M3 with one scale per token per 128 channels, ``out^T = W x^T`` on the
wgmma (weight rows on its 64-row side, tokens padded to 16 by the TMA's zero fill), each K tile's dot from zero
scaled by its activation group scale into an fp32 accumulator, the weight scale at the end; the same products and
the same order of K tiles as ``fp8_gemv`` without a split, so the outputs are the Triton kernel's bits at split 1.

Gluon's API changes between Triton releases (3.9 renamed the TMA copies), so the kernel is built only where it was
measured: ``supported()`` is False unless Triton is 3.6.x, the device is sm_90 and ``RADIXLM_DISABLE_GLUON`` is
unset; everything else keeps the Triton kernel.  CPU CI cannot compile it (its Triton is another release); the GPU
runs ``tests/unit/test_gluon_gemv.py``.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

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


def ring(k: int) -> tuple[int, int]:
    """The launch's ring for a K of ``k``: (slots, 128-wide K tiles a slot); every slot's weight is requested
    before the PDL wait.  Run S5's best at Llama-3.1-8B's shapes: 6 x 2 at K 4096 (o 8.78 us against the Triton
    kernel's 9.29, qkv 10.76 against 11.01, quantizer + GEMV with PDL), 4 x 4 at K 14336 (down 20.51 against
    21.80)."""
    return (6, 2) if k <= 8192 else (4, 4)


@functools.cache
def _enabled(device: torch.device) -> bool:
    return (gluon is not None and device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)
            and os.environ.get("RADIXLM_DISABLE_GLUON", "0") in ("", "0"))


def applies(n: int, k: int, m: int, num_sms: int) -> bool:
    """Whether a GEMV of ``m`` tokens by an ``[n, k]`` weight goes to this kernel (on a device where it is
    enabled): decode rows, K a whole number of activation groups, and a narrow weight, whose 64-row tiles leave
    the Triton kernel splitting K (fewer than two a SM) yet fill a quarter of the SMs or more without a split (the
    shapes run S5 measured: 64-96 tiles on 132 SMs)."""
    tiles = triton.cdiv(n, BLOCK_N)
    return 1 <= m <= BLOCK_M and k % BLOCK_K == 0 and k >= 2048 and num_sms // 4 <= tiles < 2 * num_sms


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
    def _load_partition(w_desc, x_desc, w_smem, x_smem, ready, empty, off_n, n_slots,
                        STAGES: gl.constexpr, SUB: gl.constexpr):
        """The producer warp: slot i's K tiles once the consumer has released the slot (the first STAGES slots'
        weights were requested before the PDL wait, by the kernel's body; their activations follow here)."""
        slot_bytes: gl.constexpr = SUB * (w_desc.block_type.nbytes + x_desc.block_type.nbytes)
        for i in range(n_slots):
            s = i % STAGES
            if i < STAGES:
                for j in gl.static_range(SUB):
                    tma.async_copy_global_to_shared(x_desc, [0, (i * SUB + j) * 128], ready.index(s),
                                                    x_smem.index(s * SUB + j))
            else:  # the consumer's (i // STAGES)-th release of the slot completes the barrier's phase before
                mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
                mbarrier.expect(ready.index(s), slot_bytes)
                for j in gl.static_range(SUB):
                    tma.async_copy_global_to_shared(w_desc, [off_n, (i * SUB + j) * 128], ready.index(s),
                                                    w_smem.index(s * SUB + j))
                    tma.async_copy_global_to_shared(x_desc, [0, (i * SUB + j) * 128], ready.index(s),
                                                    x_smem.index(s * SUB + j))

    @gluon.jit
    def _mma_partition(w_smem, x_smem, xs_smem, ready, empty, n_slots, STAGES: gl.constexpr, SUB: gl.constexpr,
                       num_warps: gl.constexpr):
        """The wgmma warp group: each K tile's dot from zero, scaled by its activation group scales into the fp32
        accumulator ([64 weight rows, 16 tokens]); then the slot goes back to the producer."""
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                             instr_shape=[16, 16, 32])
        acc = gl.zeros([64, 16], gl.float32, acc_layout)
        zero = gl.zeros([64, 16], gl.float32, acc_layout)
        for i in range(n_slots):
            s = i % STAGES
            mbarrier.wait(ready.index(s), (i // STAGES) & 1)
            for j in gl.static_range(SUB):
                w_tile = w_smem.index(s * SUB + j)  # [64, 128] fp8
                x_tile = x_smem.index(s * SUB + j)  # [16, 128] fp8
                part = warpgroup_mma(w_tile, x_tile.permute((1, 0)), zero, use_acc=False, is_async=True)
                part = warpgroup_mma_wait(num_outstanding=0, deps=(part, w_tile, x_tile))[0]
                x_s = xs_smem.index(i * SUB + j).load(gl.SliceLayout(0, acc_layout))  # [16] the tile's scales
                acc += part * gl.expand_dims(x_s, 0)
            mbarrier.arrive(empty.index(s), count=1)
        return (acc, )  # a default partition returns a tuple

    @gluon.jit
    def _gemv_kernel(w_desc, x_desc, xs_ptr, ws_ptr, out_ptr, m_dim, n_dim, k_dim, stride_xsm, stride_om,
                     STAGES: gl.constexpr, SUB: gl.constexpr, MAX_TILES: gl.constexpr, PDL: gl.constexpr,
                     num_warps: gl.constexpr):
        off_n = gl.program_id(0) * 64
        k_tiles = k_dim // 128
        n_slots = gl.cdiv(k_tiles, SUB)  # a slot's tiles past K: TMA zero fill, and zero scales below

        w_smem = gl.allocate_shared_memory(w_desc.dtype, [STAGES * SUB, 64, 128], w_desc.layout)
        x_smem = gl.allocate_shared_memory(x_desc.dtype, [STAGES * SUB, 16, 128], x_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for slot in gl.static_range(STAGES):
            mbarrier.init(ready.index(slot), count=1)
            mbarrier.init(empty.index(slot), count=1)
        slot_bytes: gl.constexpr = SUB * (w_desc.block_type.nbytes + x_desc.block_type.nbytes)
        for slot in gl.static_range(STAGES):
            live = slot < n_slots
            mbarrier.expect(ready.index(slot), slot_bytes, pred=live)
            for j in gl.static_range(SUB):
                tma.async_copy_global_to_shared(w_desc, [off_n, (slot * SUB + j) * 128], ready.index(slot),
                                                w_smem.index(slot * SUB + j), pred=live)
        _pdl_wait(PDL)  # activations (and their scales) are the kernel before's output

        # The activation group scales go to shared memory once ([K tile, token]; zero past K and past M): a global
        # load per K tile would stall every tile (run S1: 27 GB/s a program).
        scale_layout: gl.constexpr = gl.BlockedLayout([1, 1], [2, 16], [num_warps, 1], [1, 0])
        tiles = gl.arange(0, MAX_TILES, layout=gl.SliceLayout(1, scale_layout))
        tokens = gl.arange(0, 16, layout=gl.SliceLayout(0, scale_layout))
        scale_mask = gl.expand_dims(tiles < k_tiles, 1) & gl.expand_dims(tokens < m_dim, 0)
        scales = gl.load(xs_ptr + gl.expand_dims(tokens, 0) * stride_xsm + gl.expand_dims(tiles, 1),
                         mask=scale_mask, other=0.0)  # [MAX_TILES, 16]
        flat: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
        xs_smem = gl.allocate_shared_memory(gl.float32, [MAX_TILES * 16], flat, gl.reshape(scales, [MAX_TILES * 16]))
        xs_smem = xs_smem._reinterpret(gl.float32, [MAX_TILES, 16], flat)
        gl.thread_barrier()

        acc, = gl.warp_specialize([
            (_mma_partition, (w_smem, x_smem, xs_smem, ready, empty, n_slots, STAGES, SUB, num_warps)),
            (_load_partition, (w_desc, x_desc, w_smem, x_smem, ready, empty, off_n, n_slots, STAGES, SUB)),
        ], [1], [40])
        _pdl_trigger(PDL)

        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                             instr_shape=[16, 16, 32])
        rows = gl.arange(0, 16, layout=gl.SliceLayout(0, acc_layout))  # tokens
        cols = off_n + gl.arange(0, 64, layout=gl.SliceLayout(1, acc_layout))  # outputs
        col_ok = cols < n_dim
        acc = acc * gl.expand_dims(gl.load(ws_ptr + cols, mask=col_ok, other=0.0), 1)
        mask = gl.expand_dims(col_ok, 1) & gl.expand_dims(rows < m_dim, 0)
        gl.store(out_ptr + gl.expand_dims(rows, 0) * stride_om + gl.expand_dims(cols, 1),
                 acc.to(out_ptr.dtype.element_ty), mask=mask)


def gluon_fp8_gemv(
    x_q: torch.Tensor,  # [M <= 16, K] float8_e4m3fn
    x_s: torch.Tensor,  # [M, K / 128] float32
    weight: torch.Tensor,  # [N, K] float8_e4m3fn
    weight_scale: torch.Tensor,  # [N] float32
    out_dtype: torch.dtype,
    pdl: bool,
) -> torch.Tensor:  # [M, N] out_dtype
    """``(x_q * x_s) @ (weight * weight_scale)^T`` (see the module docstring); callers check ``supported``."""
    m, k = x_q.shape
    n = weight.shape[0]
    stages, sub = ring(k)
    w_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], gl.float8e4nv)
    x_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], gl.float8e4nv)
    w_desc = TensorDescriptor(weight, [n, k], [weight.stride(0), 1], [BLOCK_N, BLOCK_K], w_layout)
    x_desc = TensorDescriptor(x_q, [m, k], [x_q.stride(0), 1], [BLOCK_M, BLOCK_K], x_layout)
    out = torch.empty((m, n), dtype=out_dtype, device=x_q.device)
    tiles = k // BLOCK_K
    _gemv_kernel[(triton.cdiv(n, BLOCK_N),)](
        w_desc, x_desc, x_s, weight_scale, out, m, n, k, x_s.stride(0), out.stride(0),
        STAGES=stages, SUB=sub, MAX_TILES=triton.next_power_of_2(triton.cdiv(tiles, sub) * sub), PDL=pdl, num_warps=4,
        **({"launch_pdl": True} if pdl else {}))
    return out
