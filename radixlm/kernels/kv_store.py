"""Storing a step's new K/V rows into the KV cache on CUDA: ``k_buf[loc] = k`` and ``v_buf[loc] = v`` in one Triton
launch (a program per row and buffer), cast to the cache's dtype, or for an FP8 cache ``fp8(x / scale)``,
saturated.

torch's forms cost more than the kernels' work: an indexed assignment is an ``index_put`` launch per buffer
(two a layer, ~2.9 us each on an H200 for Llama-3.1-8B's decode rows, GPU run I1: 0.18 ms of a 3.5 ms step),
and an FP8 store five (widen, divide, clamp, cast, scatter; 0.5 ms a step, run H).  For FP8 the division is IEEE
(``div_rn``) and the rounding to the format is done in arithmetic (``round_to_e4m3`` / ``round_to_e5m2``), so
the stored bytes equal torch's on a GPU and under Triton's CPU interpreter alike.

A kernel that produces K and V can store them itself through a ``KVStore`` (the rotary kernel,
``fused_ops.apply_rotary``): ``cache_value`` and ``store_row`` are the stored form both kernels share.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from radixlm.kernels.fp8_gemm import round_to_e4m3, round_to_e5m2
from radixlm.kernels.pdl import pdl_launch_kwargs, pdl_trigger, pdl_wait

_BLOCK = 1024  # columns a program moves per iteration (a Llama-8B row of 8 KV heads x 128 in one)


class KVStore(NamedTuple):
    """Where a step's new K/V rows go, for a kernel that writes them itself (the rotary kernel stores the
    rotated K and V: ``fused_ops.apply_rotary``): slots ``loc`` [n] of one layer's contiguous ``k_buf``
    [slots, heads, head_dim] and ``v_buf`` [slots, heads, v_head_dim], with an FP8 cache's ``k_scale`` and
    ``v_scale`` ([1] float32; None unquantized).  A KV pool hands it out (``KVPool.store_target``)."""

    k_buf: torch.Tensor
    v_buf: torch.Tensor
    loc: torch.Tensor
    k_scale: torch.Tensor | None
    v_scale: torch.Tensor | None

    @property
    def quantized(self) -> bool:
        return self.k_buf.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)

    def store(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """``store_kv`` of ``k`` and ``v`` [n, heads, dim] here (for callers that did not fuse the store)."""
        store_kv(self.k_buf, self.loc, k, self.v_buf, v, self.k_scale, self.v_scale)


@triton.jit
def cache_value(x, scale_ptr, fp8_max, QUANT: tl.constexpr, E4M3: tl.constexpr):
    """Loaded (or computed, fp32) values as the cache stores them before the cast to its dtype: as they are, or
    for an FP8 cache ``x / scale`` saturated and rounded to the format in arithmetic."""
    if QUANT:
        y = tl.clamp(tl.math.div_rn(x.to(tl.float32), tl.load(scale_ptr)), -fp8_max, fp8_max)
        if E4M3:
            y = round_to_e4m3(y)
        else:
            y = round_to_e5m2(y)
    else:
        y = x
    return y


@triton.jit
def store_row(x_ptr, buf_ptr, scale_ptr, row, slot, width, stride_x, fp8_max,
              QUANT: tl.constexpr, E4M3: tl.constexpr, BLOCK: tl.constexpr):
    """Row ``row`` of ``x`` (``width`` values, unit stride) into slot ``slot`` of a contiguous buffer."""
    src = x_ptr + row.to(tl.int64) * stride_x
    dst = buf_ptr + slot * width
    for start in range(0, width, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < width
        x = tl.load(src + cols, mask=mask, other=0.0)
        tl.store(dst + cols, cache_value(x, scale_ptr, fp8_max, QUANT, E4M3).to(buf_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, loc_ptr, k_buf_ptr, v_buf_ptr, k_scale_ptr, v_scale_ptr,
                     k_width, v_width, stride_k, stride_v, fp8_max,
                     QUANT: tl.constexpr, E4M3: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    # Program (row, buffer): row ``row`` of K (buffer 0) or V (buffer 1) into slot ``loc[row]``.
    pdl_trigger(PDL)
    pdl_wait(PDL)
    row = tl.program_id(0)
    slot = tl.load(loc_ptr + row).to(tl.int64)
    if tl.program_id(1) == 0:
        store_row(k_ptr, k_buf_ptr, k_scale_ptr, row, slot, k_width, stride_k, fp8_max, QUANT, E4M3, BLOCK)
    else:
        store_row(v_ptr, v_buf_ptr, v_scale_ptr, row, slot, v_width, stride_v, fp8_max, QUANT, E4M3, BLOCK)


def _rows(x: torch.Tensor, n: int, width: int) -> torch.Tensor:
    """``x`` [n, heads, dim] (or [n, heads * dim]) as [n, width] rows with unit stride along the row."""
    rows = x.reshape(n, width)
    return rows if rows.stride(1) == 1 else rows.contiguous()


def store_kv(
    k_buf: torch.Tensor,  # [num_slots, heads, dim], contiguous; FP8 (with scales) or any float dtype
    loc: torch.Tensor,  # [n] slot indices (int32 / int64)
    k: torch.Tensor,  # [n, heads, dim] (or [n, heads * dim]) any float dtype; each row's heads x dim contiguous
    v_buf: torch.Tensor | None = None,  # [num_slots, v_heads, v_dim], K's dtype; None: K only (MLA's latent)
    v: torch.Tensor | None = None,  # [n, v_heads, v_dim]
    k_scale: torch.Tensor | None = None,  # [1] float32: the FP8 cache's scales (None: a plain cast)
    v_scale: torch.Tensor | None = None,
) -> None:
    """``k_buf[loc] = k`` and ``v_buf[loc] = v`` in the buffers' dtype; an FP8 cache's values are
    ``fp8(clamp(x / scale))`` (what ``KVPool._store`` does in torch)."""
    n = loc.shape[0]
    quant = k_buf.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    if quant and (k_scale is None or (v_buf is not None and v_scale is None)):
        raise ValueError("an FP8 cache's store needs its scales")
    if not k_buf.is_contiguous() or (v_buf is not None and (not v_buf.is_contiguous() or v_buf.dtype != k_buf.dtype)):
        raise ValueError("store_kv needs contiguous K and V buffers of one dtype")
    if n == 0:
        return
    k_width = k_buf.shape[1] * k_buf.shape[2]
    k_rows = _rows(k, n, k_width)
    v_width = v_buf.shape[1] * v_buf.shape[2] if v_buf is not None else 0
    v_rows = _rows(v, n, v_width) if v_buf is not None else k_rows
    k_scale = k_scale if quant else k_buf  # not read
    v_scale = v_scale if quant and v_buf is not None else k_scale
    fp8_max = torch.finfo(k_buf.dtype).max if quant else 0.0
    _store_kv_kernel[(n, 2 if v_buf is not None else 1)](
        k_rows, v_rows, loc, k_buf, v_buf if v_buf is not None else k_buf, k_scale, v_scale,
        k_width, v_width, k_rows.stride(0), v_rows.stride(0), fp8_max,
        QUANT=quant, E4M3=k_buf.dtype == torch.float8_e4m3fn, BLOCK=min(_BLOCK, triton.next_power_of_2(
            max(k_width, v_width))), num_warps=4, **pdl_launch_kwargs(k_buf.device),
    )
