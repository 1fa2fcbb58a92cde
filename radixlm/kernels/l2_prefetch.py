"""Pulling a weight into L2 while the memory bus would otherwise idle (sm_90, under PDL).

A batch-1 decode step alternates memory-bound GEMVs with short kernels (rotary, the decode attention over a short
context, norms) during which HBM carries almost nothing.  ``l2_prefetch(t, nbytes)`` starts copying the first
``nbytes`` of a contiguous tensor into L2 with the TMA unit's bulk prefetch, from a launch that joins the PDL chain
and returns at once: the copies go on while the kernels after it run, and the GEMV that later reads those bytes
finds them in L2.  (Prefetching inside the GEMV itself, before its PDL wait, gained nothing: GPU runs J1, K1; there
the prefetch and the GEMV's stream share the same time window.)

Each program issues ``LANES`` bulk prefetches of ``LANE_BYTES``; the kernel keeps the PDL contract
(``radixlm.kernels.pdl``): it loads and stores nothing, triggers at once, and waits for the kernel before it before
it exits, so the kernel after it, which waits for this one, still sees everything before it finished.  Where the
device cannot (no PDL: CPU, the Triton interpreter, before sm_90) the call does nothing: it is a hint.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixlm.kernels.pdl import pdl_enabled, pdl_trigger, pdl_wait

LANES = 32
LANE_BYTES = 4096


@triton.jit
def _l2_prefetch_kernel(base_ptr, nbytes, LANES: tl.constexpr, LANE_BYTES: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * (LANES * LANE_BYTES) + tl.arange(0, LANES).to(tl.int64) * LANE_BYTES
    size = tl.minimum(nbytes - offs, LANE_BYTES)  # a multiple of 16 where > 0 (nbytes is)
    addr = base_ptr + offs
    # Lanes past the end prefetch nothing: their size is clamped to 0 and the instruction is predicated off.
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; }\n\tmov.u32 $0, 0;",
        "=r,l,r", [addr, size.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)
    pdl_trigger(True)
    pdl_wait(True)


def l2_prefetch(tensor: torch.Tensor, nbytes: int | None = None, offset: int = 0) -> None:
    """Start pulling ``nbytes`` (default: to the end; rounded down to 16) of ``tensor``'s storage from byte
    ``offset`` (a multiple of 16) into L2 on the current stream.  ``tensor`` must be contiguous; a no-op where PDL
    is off (see the module docstring)."""
    if not pdl_enabled(tensor.device):
        return
    if not tensor.is_contiguous() or tensor.data_ptr() % 16 or offset % 16:
        raise ValueError("l2_prefetch needs a contiguous, 16-byte aligned tensor and offset")
    left = tensor.numel() * tensor.element_size() - offset
    nbytes = (left if nbytes is None else min(nbytes, left)) // 16 * 16
    if nbytes <= 0:
        return
    byte_view = tensor.view(-1).view(torch.uint8)[offset:]
    grid = (triton.cdiv(nbytes, LANES * LANE_BYTES),)
    _l2_prefetch_kernel[grid](byte_view, nbytes, LANES=LANES, LANE_BYTES=LANE_BYTES, num_warps=1, launch_pdl=True)
