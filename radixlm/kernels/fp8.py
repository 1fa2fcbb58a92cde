"""Block-wise FP8 (W8A8) as DeepSeek-V3 ships it: E4M3 weights with one float32 scale per ``[bn, bk]`` block
(``weight_scale_inv``, multiplied to dequantize), activations quantized at run time per token per group of ``bk``
channels, and a GEMM that accumulates in fp32 and applies (activation group scale x weight block scale) per
``bk``-wide K slice.

    W[n, k] = Wq[n, k] * S[n // bn, k // bk]          x[m, k] = xq[m, k] * s[m, k // bk]
    out[m, n] = sum_j s[m, j] * S[n // bn, j] * sum_{k in slice j} xq[m, k] * Wq[n, k]

CUDA tensors run the Triton kernels of ``radixlm.kernels.fp8_gemm`` (imported on first CUDA call: CPU-only
installs may lack triton); other tensors run the torch code here, which is also the reference the tests check
the Triton kernels against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
# Floor of a group's max |x|, so an all-zero group gets a finite scale and quantizes to zeros (not 0 / 0).
SCALE_EPS = 1e-10
DEFAULT_BLOCK = (128, 128)


def check_group_size(k: int, group_size: int) -> None:
    if group_size <= 0 or k % group_size:
        raise ValueError(f"per-token-group FP8 quantization needs K ({k}) to be a multiple of the group size "
                         f"({group_size})")


def per_token_group_quant_fp8(
    x: torch.Tensor,  # [M, K] bf16/fp16/fp32
    group_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:  # x_q [M, K] float8_e4m3fn, scales [M, K // group_size] float32
    """``scales[m, g] = max(max|x[m, group g]|, SCALE_EPS) / 448`` and ``x_q = fp8(x / scale)`` (round to
    nearest even; |x / scale| <= 448 by construction).  K must be a multiple of ``group_size`` (ValueError).
    CUDA runs the Triton kernel, bit-identical to the torch code."""
    check_group_size(x.shape[-1], group_size)
    if x.is_cuda:
        from radixlm.kernels.fp8_gemm import per_token_group_quant_fp8_triton

        return per_token_group_quant_fp8_triton(x, group_size)
    return per_token_group_quant_fp8_torch(x, group_size)


def per_token_group_quant_fp8_torch(
    x: torch.Tensor, group_size: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_token_group_quant_fp8`` with torch ops (the definition)."""
    check_group_size(x.shape[-1], group_size)
    m, k = x.shape
    groups = x.float().reshape(m, k // group_size, group_size)  # [M, G, group_size]
    scales = groups.abs().amax(dim=-1).clamp_min(SCALE_EPS) / FP8_MAX  # [M, G]
    # The clamp only guards rounding of the division; max|x| / scale is 448 up to one ulp.
    x_q = (groups / scales[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return x_q.reshape(m, k), scales


def dequantize_block_fp8(
    w_q: torch.Tensor,  # [..., N, K] fp8
    scale: torch.Tensor,  # [..., ceil(N / bn), ceil(K / bk)] float32
    block_size: tuple[int, int] = DEFAULT_BLOCK,
) -> torch.Tensor:  # [..., N, K] float32
    """``W[n, k] = w_q[n, k] * scale[n // bn, k // bk]`` in float32 (the last block of each dimension may be
    partial).  Leading dimensions (experts) are carried along."""
    bn, bk = block_size
    n, k = w_q.shape[-2:]
    full = scale.repeat_interleave(bn, dim=-2)[..., :n, :].repeat_interleave(bk, dim=-1)[..., :k]
    return w_q.float() * full


def quantize_block_fp8(
    w: torch.Tensor,  # [..., N, K] any float dtype
    block_size: tuple[int, int] = DEFAULT_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:  # [..., N, K] fp8, [..., ceil(N / bn), ceil(K / bk)] float32
    """The inverse of ``dequantize_block_fp8``, as a checkpoint is made: one scale per block,
    ``max(max |block|, SCALE_EPS) / 448``, and ``fp8(w / scale)`` (round to nearest even); edge blocks may be
    partial.  Works in float32 on w's device: callers with large weights pass one expert at a time."""
    bn, bk = block_size
    n, k = w.shape[-2:]
    wf = w.float()
    padded = F.pad(wf, (0, -k % bk, 0, -n % bn))  # zeros do not change a block's max |w|
    blocks = padded.unflatten(-1, (-1, bk)).unflatten(-3, (-1, bn))  # [..., N / bn, bn, K / bk, bk]
    scale = blocks.abs().amax(dim=(-3, -1)).clamp_min(SCALE_EPS) / FP8_MAX  # [..., N / bn, K / bk]
    full = scale.repeat_interleave(bn, dim=-2)[..., :n, :].repeat_interleave(bk, dim=-1)[..., :k]
    return (wf / full).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def w8a8_block_fp8_matmul(
    a_q: torch.Tensor,  # [M, K] fp8
    a_s: torch.Tensor,  # [M, ceil(K / bk)] float32
    b_q: torch.Tensor,  # [N, K] fp8
    b_s: torch.Tensor,  # [ceil(N / bn), ceil(K / bk)] float32
    block_size: tuple[int, int] = DEFAULT_BLOCK,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:  # [M, N] out_dtype
    """``out = (a_q * a_s) @ (b_q * b_s)^T`` accumulated in fp32, rounded once to ``out_dtype``.  CUDA runs the
    Triton block-scaled GEMM (``fp8_gemm.w8a8_block_fp8_matmul_triton``, which also takes a config override);
    other devices dequantize both operands to fp32 and multiply."""
    if a_q.is_cuda:
        from radixlm.kernels.fp8_gemm import w8a8_block_fp8_matmul_triton

        return w8a8_block_fp8_matmul_triton(a_q, a_s, b_q, b_s, block_size, out_dtype)
    return w8a8_block_fp8_matmul_torch(a_q, a_s, b_q, b_s, block_size, out_dtype)


def w8a8_block_fp8_matmul_torch(
    a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor,
    block_size: tuple[int, int] = DEFAULT_BLOCK, out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``w8a8_block_fp8_matmul`` by dequantizing to fp32 (the reference)."""
    bk = block_size[1]
    a = a_q.float() * a_s.repeat_interleave(bk, dim=-1)[:, :a_q.shape[1]]  # [M, K]
    return (a @ dequantize_block_fp8(b_q, b_s, block_size).T).to(out_dtype)


def fp8_block_linear(
    x: torch.Tensor,  # [*, K], or on CUDA an FP8Activation quantized per group of bk
    weight: torch.Tensor,  # [N, K] fp8
    weight_scale_inv: torch.Tensor,  # [ceil(N / bn), ceil(K / bk)] float32
    bias: torch.Tensor | None = None,  # [N]
    block_size: tuple[int, int] = DEFAULT_BLOCK,
) -> torch.Tensor:  # [*, N], x's dtype
    """A linear layer over a block-FP8 weight.  CUDA: ``x`` quantized per token per group of ``bk`` channels
    (K must be a multiple of ``bk``; an ``fp8_activation.FP8Activation`` arrives quantized, by the kernel that
    produced it), then the block-scaled GEMM (at decode-sized M, ``fp8_gemv.SMALL_M``, the GEMV: the same numbers
    up to summation order).  Elsewhere (CI, CPU users): the weight
    dequantized to float32 on every call (no cache: the fp8 weight is the only copy kept), ``x`` rounded through
    E4M3 per token group as the GPU path quantizes it, and ``F.linear`` in float32: the GPU's numerics up to
    summation order."""
    if x.is_cuda:
        from radixlm.kernels.fp8_activation import ActivationQuant, FP8Activation, quantize_activation
        from radixlm.kernels.fp8_gemm import w8a8_block_fp8_matmul_triton
        from radixlm.kernels.fp8_gemv import SMALL_M, fp8_gemv

        quant = ActivationQuant(block_size[1])
        if isinstance(x, FP8Activation):
            x.check(quant)
        else:
            x = quantize_activation(x, quant)
        if x.q.shape[0] <= SMALL_M:  # decode-sized: the GEMV streams the weight
            out = fp8_gemv(x.q, x.scale, weight, weight_scale_inv, block_size, x.dtype)
        else:
            out = w8a8_block_fp8_matmul_triton(x.q, x.scale, weight, weight_scale_inv, block_size, x.dtype)
        if bias is not None:
            out = out + bias
        return out.view(*x.shape[:-1], weight.shape[0])
    w = dequantize_block_fp8(weight, weight_scale_inv, block_size)
    return F.linear(round_activations(x, block_size[1]), w, None if bias is None else bias.float()).to(x.dtype)


def round_activations(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``x`` [*, K] quantized per token per ``group_size`` channels and dequantized, in float32: what the FP8
    GEMMs see of their input."""
    k = x.shape[-1]
    x_q, x_s = per_token_group_quant_fp8(x.reshape(-1, k), group_size)
    return dequantize_block_fp8(x_q, x_s, (1, group_size)).view(x.shape)
