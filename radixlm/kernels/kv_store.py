"""Storing new K/V rows into an FP8 cache: ``buf[loc] = fp8(x / scale)``, saturated, in one Triton launch per
buffer (the torch form is five kernels: widen, divide, clamp, cast, scatter; 32 layers x K and V of them cost
a decode step about 0.5 ms on an H200, GPU run H).  The division is IEEE (``div_rn``) and the rounding to the
format is done in arithmetic (``round_to_e4m3`` / ``round_to_e5m2``), so the stored bytes equal torch's on a GPU
and under Triton's CPU interpreter alike."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixlm.kernels.fp8_gemm import round_to_e4m3, round_to_e5m2


@triton.jit
def _store_fp8_kernel(x_ptr, loc_ptr, buf_ptr, scale_ptr, width, stride_x, stride_buf, fp8_max,
                      E4M3: tl.constexpr, BLOCK: tl.constexpr):
    # Program (row, column block): row ``row`` of x into slot ``loc[row]``.
    row = tl.program_id(0)
    slot = tl.load(loc_ptr + row).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.clamp(tl.math.div_rn(x, tl.load(scale_ptr)), -fp8_max, fp8_max)
    if E4M3:
        y = round_to_e4m3(y)
    else:
        y = round_to_e5m2(y)
    tl.store(buf_ptr + slot * stride_buf + cols, y.to(buf_ptr.dtype.element_ty), mask=mask)


def store_fp8(
    buf: torch.Tensor,  # [num_slots, heads, dim] float8_e4m3fn or float8_e5m2, contiguous
    loc: torch.Tensor,  # [n] slot indices (int32 / int64)
    x: torch.Tensor,  # [n, heads, dim] (or [n, heads * dim]) any float dtype; each row's heads x dim contiguous
    scale: torch.Tensor,  # [1] float32
) -> None:
    """``buf[loc] = fp8(clamp(x / scale))`` (what ``KVPool._store`` does in torch)."""
    n = loc.shape[0]
    width = buf.shape[1] * buf.shape[2]
    rows = x.reshape(n, width) if x.shape[0] == n else None
    assert rows is not None and buf.is_contiguous(), "store_fp8 needs x [n, heads, dim] and a contiguous buffer"
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    if n:
        block = min(triton.next_power_of_2(width), 1024)
        _store_fp8_kernel[(n, triton.cdiv(width, block))](
            rows, loc, buf, scale, width, rows.stride(0), width, torch.finfo(buf.dtype).max,
            E4M3=buf.dtype == torch.float8_e4m3fn, BLOCK=block, num_warps=4,
        )
