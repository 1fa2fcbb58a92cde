"""Batched FP8 matmul with per-tensor activation scales and per-batch (per-head) weight scales: MLA's absorbed
products ``q_nope[h] @ W_UK[h]`` and ``o_latent[h] @ W_UV[h]^T`` (``radixlm.models.deepseek_v2``) in E4M3.

    W[b, n, k] = Wq[b, n, k] * S[b]                 S[b] = max(max |W[b]|, SCALE_EPS) / 448, once at load
    x[m, b, k] ~ xq[m, b, k] * s                    s = max(max |x|, SCALE_EPS) / 448, over the whole tensor,
                                                    xq = fp8(x * (1 / s)), round to nearest even
    out[m, b, n] = s * S[b] * sum_k xq[m, b, k] * Wq[b, n, k]      (fp32 accumulation, rounded once to out_dtype)

The activation scale is computed on the device from the tensor's amax on every call (no host read: decode is
captured in CUDA graphs); the quantization itself is fused into the GEMM, which loads x in its own dtype and
rounds each tile to E4M3 in registers.  It multiplies by the scale's inverse (one IEEE division per call, not per
element: the kernel requantizes a tile for every N tile), which rounds like torch's ``x * (1 / s)`` here.
One scale per weight batch (per head) rather than per tensor: the kernel runs one head per program, so it costs a
scalar load; a head whose weights are smaller than the largest head's keeps E4M3's full relative precision
instead of sinking toward its subnormals; and the quantized weights do not depend on which heads a
tensor-parallel rank holds.

CUDA tensors run the Triton kernel (``radixlm.kernels.fp8_bmm_kernel``, imported on first CUDA call); others run
the torch code here (the weights dequantized, the activations rounded as the kernel rounds them, an fp32 einsum),
which is the definition the kernel is tested against and shows the quantization error on CPU.
"""

from __future__ import annotations

import torch

from radixlm.kernels.fp8 import FP8_DTYPE, FP8_MAX, SCALE_EPS


def quantize_per_batch(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` [B, N, K] (any float dtype) -> (``float8_e4m3fn`` [B, N, K] contiguous, float32 scales [B]): one scale
    per leading index, ``max(max |w[b]|, SCALE_EPS) / 448``, round to nearest even."""
    wf = w.float()
    scale = wf.abs().amax(dim=(1, 2)).clamp_min(SCALE_EPS) / FP8_MAX  # [B]
    return (wf / scale[:, None, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).contiguous(), scale


def activation_amax(x: torch.Tensor) -> torch.Tensor:
    """``max |x|`` over the whole tensor as a 1-element device tensor in x's dtype (exact: a max is one of the
    values); one reduction, no host read, strided views welcome."""
    return torch.linalg.vector_norm(x, float("inf")).reshape(1)


def activation_scale(amax: torch.Tensor) -> torch.Tensor:
    """The per-tensor scale of ``activation_amax``'s result, float32: ``max(amax, SCALE_EPS) / 448``."""
    return amax.float().clamp_min(SCALE_EPS) / FP8_MAX


def fp8_bmm(
    x: torch.Tensor,  # [M, B, K] float, unit stride along K (other strides free: a view of a wider tensor)
    w_q: torch.Tensor,  # [B, N, K] float8_e4m3fn, contiguous
    w_s: torch.Tensor,  # [B] float32
    out_dtype: torch.dtype | None = None,  # default: x's dtype
) -> torch.Tensor:  # [M, B, N] out_dtype, contiguous
    """``out[m, b] = fp8(x[m, b]) @ (w_q[b] * w_s[b])^T`` with one dynamic scale for all of ``x`` (module
    docstring).  CUDA: the Triton kernel; elsewhere ``fp8_bmm_torch``."""
    out_dtype = out_dtype or x.dtype
    if x.is_cuda:
        from radixlm.kernels.fp8_bmm_kernel import fp8_bmm_triton

        return fp8_bmm_triton(x, activation_amax(x), w_q, w_s, out_dtype)
    return fp8_bmm_torch(x, w_q, w_s, out_dtype)


def round_activation(x: torch.Tensor) -> torch.Tensor:
    """``x`` through E4M3 with one per-tensor scale and back, in float32: what the kernel multiplies."""
    scale = activation_scale(activation_amax(x))
    return (x.float() * (1.0 / scale)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float() * scale


def fp8_bmm_torch(x: torch.Tensor, w_q: torch.Tensor, w_s: torch.Tensor,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``fp8_bmm`` in torch (the definition): rounded activations times dequantized weights, in float32."""
    w = w_q.float() * w_s[:, None, None]  # [B, N, K]
    return torch.einsum("mbk,bnk->mbn", round_activation(x), w).to(out_dtype or x.dtype)
