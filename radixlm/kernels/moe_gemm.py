"""The Triton path of ``radixlm.kernels.fused_moe.fused_experts``: one grouped GEMM kernel, launched twice.

The (token, expert) pairs are first grouped by expert into blocks of ``BLOCK_M`` (``moe_align``).  Each program
computes one ``[BLOCK_M, BLOCK_N]`` output tile of one block against that block's expert weight, so the weight
tile is read once for all the block's pairs, and the activation rows are gathered by pair id as they are loaded
(no permuted copy of the hidden states):

1. gate-up: ``A = hidden[pair // top_k]`` against ``w13[expert]``; each program holds two fp32 accumulators, the
   gate columns ``n`` and the up columns ``inter + n``, and writes ``silu(gate) * up`` (rounded once to the
   compute dtype), so the ``[num_pairs, 2 * inter]`` product never reaches memory.
2. down: ``A = act[pair]`` against ``w2[expert]``, scaled by the pair's routing weight in the epilogue, written
   to row ``pair`` of a ``[num_pairs, hidden]`` buffer; a reduction over the ``top_k`` rows of each token (in fp32)
   gives the output.

Programs of blocks past the device-side padded length exit at once, so nothing is read on the host and the whole
path can be captured in a CUDA graph.  Block sizes come from ``default_config`` (by the average number of pairs
per expert, which decides whether a weight tile is reused); callers such as a tuning sweep may pass their own
``GemmConfig``.

Block-FP8 experts (``BLOCK_SCALED``, see ``radixlm.kernels.fp8``): the hidden states are quantized per token per
group of ``bk`` channels before the gate-up launch and ``silu(gate) * up`` likewise before the down launch (one
extra quantization kernel each); in the K loop each tile's fp8 dot is scaled by the rows' activation scales and
the columns' weight block scales (``BLOCK_K`` divides ``bk``, so a tile lies in one K slice).  The bf16/fp16/fp32
launches are unchanged (``BLOCK_SCALED`` false compiles the same loop).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from radixlm.kernels.gemm_config import GemmConfig

from radixlm.kernels.moe_align import AlignedPairs, align_pairs_by_expert



def default_config(num_pairs: int, num_experts: int) -> GemmConfig:
    """Block sizes by the average number of pairs per expert, from the H200 sweep (``bench/gpu/fused_moe.py
    --tune``, docs/benchmarks.md).  Few pairs (decode) make the GEMM a stream over the used experts' weights:
    the smallest ``tl.dot`` M (16) wastes least on padding, and deep K tiles with several stages keep loads in
    flight.  Many pairs make it compute-bound: large tiles reuse each loaded tile more."""
    per_expert = num_pairs / max(num_experts, 1)
    if per_expert <= 8:
        return GemmConfig(16, 64, 128, group_m=1, num_warps=4, num_stages=4)
    if per_expert <= 48:
        return GemmConfig(32, 128, 128, group_m=8, num_warps=4, num_stages=3)
    if per_expert <= 192:
        return GemmConfig(64, 128, 64, group_m=8, num_warps=4, num_stages=3)
    return GemmConfig(128, 128, 64, group_m=8, num_warps=4, num_stages=3)


@triton.jit
def _moe_gemm_kernel(
    a_ptr, b_ptr, c_ptr, weights_ptr, sorted_pair_ids_ptr, block_expert_ids_ptr, num_padded_ptr,
    a_scale_ptr, b_scale_ptr,  # block FP8 only: [A rows, K slices] and [E, N blocks, K slices] float32
    num_pairs, n_out, k_dim, up_offset, num_blocks_m, group_n, group_k,
    a_row_div,  # pairs per A row: top_k when A is the token rows, 1 when A is per pair (a runtime value, so
    # every top_k shares one compiled kernel)
    stride_am, stride_be, stride_bn, stride_bk, stride_cm, stride_asm, stride_bse, stride_bsn,
    BLOCK_SCALED: tl.constexpr,  # fp8 A and B, block scales applied per K slice
    FUSE_SILU_MUL: tl.constexpr,  # B rows [up_offset, up_offset + n_out) are the up projection
    MUL_WEIGHT: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped launch order: GROUP_M consecutive M blocks walk the N blocks together.
    pid = tl.program_id(0)
    num_blocks_n = tl.cdiv(n_out, BLOCK_N)
    in_group = GROUP_M * num_blocks_n
    first_m = (pid // in_group) * GROUP_M
    group_size = min(num_blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return

    expert = tl.load(block_expert_ids_ptr + pid_m).to(tl.int64)
    pair = tl.load(sorted_pair_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M]
    row_ok = pair < num_pairs
    a_rows = (pair // a_row_div).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Wrapped columns keep every weight load in bounds without a mask; their results are not stored.
    offs_bn = (offs_n % n_out).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)

    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    b_ptrs = b_ptr + expert * stride_be + offs_bn[None, :] * stride_bn + offs_k[:, None] * stride_bk
    if BLOCK_SCALED:
        as_ptrs = a_scale_ptr + a_rows * stride_asm  # [BLOCK_M]
        bs_ptrs = b_scale_ptr + expert * stride_bse + (offs_bn // group_n) * stride_bsn  # [BLOCK_N]
        bs_up_ptrs = b_scale_ptr + expert * stride_bse + ((offs_bn + up_offset) // group_n) * stride_bsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(k_dim, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            b = tl.load(b_ptrs)
            if FUSE_SILU_MUL:
                b_up = tl.load(b_ptrs + up_offset * stride_bn)
        else:
            k_ok = offs_k < k_dim - k * BLOCK_K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
            if FUSE_SILU_MUL:
                b_up = tl.load(b_ptrs + up_offset * stride_bn, mask=k_ok[:, None], other=0.0)
        if BLOCK_SCALED:
            # BLOCK_K divides group_k, so the tile lies in one K slice of both operands' scales.
            k_slice = (k * BLOCK_K) // group_k
            a_s = tl.load(as_ptrs + k_slice, mask=row_ok, other=0.0)
            acc += tl.dot(a, b) * a_s[:, None] * tl.load(bs_ptrs + k_slice)[None, :]
            if FUSE_SILU_MUL:
                acc_up += tl.dot(a, b_up) * a_s[:, None] * tl.load(bs_up_ptrs + k_slice)[None, :]
        else:
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            if FUSE_SILU_MUL:
                acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk

    if FUSE_SILU_MUL:
        acc = acc * tl.sigmoid(acc) * acc_up
    if MUL_WEIGHT:
        acc = acc * tl.load(weights_ptr + pair, mask=row_ok, other=0.0)[:, None]
    c_ptrs = c_ptr + pair.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n < n_out)[None, :])


class BlockScales(NamedTuple):
    """The block-FP8 operands' scales of one GEMM: ``a`` per A row and K slice, ``b`` per expert, N block and K
    slice; ``block_shape`` is ``(bn, bk)``."""

    a: torch.Tensor  # [A rows, K // bk] float32
    b: torch.Tensor  # [E, ceil(N' / bn), ceil(K / bk)] float32
    block_shape: tuple[int, int]


def _launch_gemm(
    a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, weights: torch.Tensor | None, aligned: AlignedPairs,
    num_pairs: int, a_row_div: int, fuse_silu_mul: bool, config: GemmConfig, scales: BlockScales | None = None,
) -> None:
    """``c[pair] = epilogue(a[pair // a_row_div] @ b[expert(pair)]^T)`` for every pair; ``b`` [E, N', K].  With
    ``scales``, ``a`` and ``b`` are fp8 and each K slice's product is scaled by their block scales."""
    n_out, k_dim = c.shape[1], a.shape[1]
    num_blocks_m = aligned.block_expert_ids.numel()
    block_n = max(config.block_n // 2, 16) if fuse_silu_mul else config.block_n
    grid = (num_blocks_m * triton.cdiv(n_out, block_n),)
    group_n, group_k = scales.block_shape if scales is not None else (1, 1)
    _moe_gemm_kernel[grid](
        a, b, c, weights, aligned.sorted_pair_ids, aligned.block_expert_ids, aligned.num_padded,
        None if scales is None else scales.a, None if scales is None else scales.b,
        num_pairs, n_out, k_dim, n_out, num_blocks_m, group_n, group_k, a_row_div,
        a.stride(0), b.stride(0), b.stride(1), b.stride(2), c.stride(0),
        0 if scales is None else scales.a.stride(0), *((0, 0) if scales is None else scales.b.stride()[:2]),
        BLOCK_SCALED=scales is not None, FUSE_SILU_MUL=fuse_silu_mul, MUL_WEIGHT=weights is not None,
        EVEN_K=k_dim % config.block_k == 0,
        # fp32 operands get full fp32 products (not TF32), so the fp32 path is an exact reference.
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        BLOCK_M=config.block_m, BLOCK_N=block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )


def fused_experts_triton(
    hidden: torch.Tensor,  # [num_tokens, hidden]
    w13: torch.Tensor,  # [num_experts, 2 * inter, hidden]  (fp8 with w13_scale)
    w2: torch.Tensor,  # [num_experts, hidden, inter]  (fp8 with w2_scale)
    topk_weights: torch.Tensor,  # [num_tokens, top_k] float32
    topk_ids: torch.Tensor,  # [num_tokens, top_k] int32/int64
    config: GemmConfig | None = None,
    w13_scale: torch.Tensor | None = None,  # [num_experts, ceil(2 * inter / bn), ceil(hidden / bk)] float32
    w2_scale: torch.Tensor | None = None,  # [num_experts, ceil(hidden / bn), ceil(inter / bk)] float32
    block_shape: tuple[int, int] | None = None,  # (bn, bk) of the weight scales; (128, 128) if None
) -> torch.Tensor:  # [num_tokens, hidden]
    """``fused_experts`` on any device Triton runs on (CUDA, or CPU under TRITON_INTERPRET=1); ``config``
    overrides ``default_config``.  The weights may have any strides; the activations are made contiguous.

    Block FP8 experts (``w13_scale`` and ``w2_scale`` given): ``hidden`` is quantized per token per group of
    ``bk`` channels before the gate-up GEMM, and ``silu(gate) * up`` (rounded to hidden's dtype) likewise before
    the down GEMM; ``hidden`` and ``inter`` must be multiples of ``bk``, and ``config.block_k`` must divide it
    (``default_config``'s is capped at ``bk``)."""
    num_tokens, hidden_size = hidden.shape
    num_experts, two_inter, _ = w13.shape
    inter = two_inter // 2
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    if num_pairs == 0:
        return torch.empty_like(hidden, memory_format=torch.contiguous_format)
    block_fp8 = w13_scale is not None
    if block_fp8:
        block_shape = tuple(block_shape or (128, 128))
    if config is None:
        config = default_config(num_pairs, num_experts)
        if block_fp8:  # a K tile must lie in one scale slice (bk < 128 only in small test models)
            config = config._replace(block_k=min(config.block_k, block_shape[1]))
    if block_fp8:
        if w2_scale is None or block_shape[1] % config.block_k:
            raise ValueError(f"block FP8 experts need both scales and config.block_k ({config.block_k}) "
                             f"dividing the scale block's K size ({block_shape[1]})")
        from radixlm.kernels.fp8_gemm import per_token_group_quant_fp8_triton
    hidden = hidden.contiguous()
    weights = topk_weights.contiguous()
    if weights.dtype != torch.float32:
        weights = weights.float()
    aligned = align_pairs_by_expert(topk_ids, num_experts, config.block_m)

    act = torch.empty((num_pairs, inter), dtype=hidden.dtype, device=hidden.device)  # silu(gate) * up
    if block_fp8:
        hidden_q, hidden_s = per_token_group_quant_fp8_triton(hidden, block_shape[1])
        scales = BlockScales(hidden_s, w13_scale, block_shape)
        _launch_gemm(hidden_q, w13, act, None, aligned, num_pairs, top_k, True, config, scales)
    else:
        _launch_gemm(hidden, w13, act, None, aligned, num_pairs, top_k, True, config)
    per_pair = torch.empty((num_pairs, hidden_size), dtype=hidden.dtype, device=hidden.device)
    if block_fp8:
        act_q, act_s = per_token_group_quant_fp8_triton(act, block_shape[1])
        scales = BlockScales(act_s, w2_scale, block_shape)
        _launch_gemm(act_q, w2, per_pair, weights, aligned, num_pairs, 1, False, config, scales)
    else:
        _launch_gemm(act, w2, per_pair, weights, aligned, num_pairs, 1, False, config)
    if top_k == 1:  # each token's single pair row is its output row
        return per_pair
    # torch sums fp16/bf16 in fp32 and rounds once: one kernel, no fp32 copy.
    return per_pair.view(num_tokens, top_k, hidden_size).sum(dim=1)
