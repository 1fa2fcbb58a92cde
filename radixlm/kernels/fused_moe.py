"""The routed experts of a mixture-of-experts layer: ``fused_experts``, Triton on CUDA, grouped torch on CPU.

Every token's hidden state goes through the SiLU-gated MLP of each of its ``top_k`` chosen experts, and the
results are summed with the routing weights.  Under tensor parallelism each rank holds a slice of every expert's
intermediate dimension and returns a partial sum, which the caller all-reduces; nothing here is distributed.

The Triton path is ``radixlm.kernels.moe_gemm`` (imported on first CUDA call: CPU-only installs may lack
triton); the CPU path below is also the reference the tests check the Triton one against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from radixlm.kernels.fp8 import DEFAULT_BLOCK, dequantize_block_fp8, round_activations


def fused_experts(
    hidden: torch.Tensor,  # [num_tokens, hidden]  bf16/fp16/fp32
    w13: torch.Tensor,  # [num_experts, 2 * inter, hidden]  gate rows [0, inter), up rows [inter, 2 * inter)
    w2: torch.Tensor,  # [num_experts, hidden, inter]
    topk_weights: torch.Tensor,  # [num_tokens, top_k] float32
    topk_ids: torch.Tensor,  # [num_tokens, top_k] int32 or int64, values in [0, num_experts)
    w13_scale: torch.Tensor | None = None,  # [num_experts, ceil(2 * inter / bn), ceil(hidden / bk)] float32
    w2_scale: torch.Tensor | None = None,  # [num_experts, ceil(hidden / bn), ceil(inter / bk)] float32
    block_shape: tuple[int, int] | None = None,  # (bn, bk), (128, 128) if None
) -> torch.Tensor:  # [num_tokens, hidden], hidden's dtype
    """``out[t] = sum_k topk_weights[t, k] * (w2[e] @ (silu(w13[e, :inter] @ x_t) * (w13[e, inter:] @ x_t)))``
    with ``e = topk_ids[t, k]``, accumulated in fp32.

    The products are rounded once to the compute dtype (``hidden``'s) after each GEMM, as the activation
    ``silu(gate) * up`` and as each expert's weighted output, before the fp32 sum over ``top_k``.  CUDA tensors
    run the Triton kernels (no host sync: capturable in a CUDA graph); others run ``fused_experts_torch``.

    Block FP8 experts (DeepSeek-V3's format, see ``radixlm.kernels.fp8``): ``w13``/``w2`` in float8_e4m3fn with
    ``w13_scale``/``w2_scale`` one float32 per ``block_shape`` block.  The activations are quantized per token per
    group of ``bk`` channels before each GEMM (the intermediate ``silu(gate) * up`` too, after its rounding to
    the compute dtype); ``hidden`` and ``inter`` must be multiples of ``bk``.  On CUDA the block scales are
    applied in the grouped GEMM's K loop; elsewhere the experts are dequantized to float32 (on every call: a
    layer that runs often caches them and calls ``fused_experts_torch`` itself, as ``FusedMoE`` does) and the
    torch path rounds the activations through E4M3 as the GPU quantizes them (``act_group``), so CPU results
    show the GPU's quantization error.
    """
    if (w13_scale is None) != (w2_scale is None):
        raise ValueError("block FP8 experts need both w13_scale and w2_scale")
    if hidden.is_cuda:
        from radixlm.kernels.moe_gemm import fused_experts_triton

        return fused_experts_triton(hidden, w13, w2, topk_weights, topk_ids, w13_scale=w13_scale,
                                    w2_scale=w2_scale, block_shape=block_shape)
    if w13_scale is None:
        return fused_experts_torch(hidden, w13, w2, topk_weights, topk_ids)
    block_shape = tuple(block_shape or DEFAULT_BLOCK)
    w13 = dequantize_block_fp8(w13, w13_scale, block_shape)
    w2 = dequantize_block_fp8(w2, w2_scale, block_shape)
    return fused_experts_torch(hidden, w13, w2, topk_weights, topk_ids, act_group=block_shape[1])


def fused_experts_torch(
    hidden: torch.Tensor,  # [num_tokens, hidden]
    w13: torch.Tensor,  # [num_experts, 2 * inter, hidden]
    w2: torch.Tensor,  # [num_experts, hidden, inter]
    topk_weights: torch.Tensor,  # [num_tokens, top_k]
    topk_ids: torch.Tensor,  # [num_tokens, top_k]
    act_group: int | None = None,  # FP8 experts' activation group size (bk); the weights are then dequantized
) -> torch.Tensor:  # [num_tokens, hidden]
    """``fused_experts`` with torch ops: the pairs sorted by expert, then one gate-up and one down GEMM per expert
    that receives tokens, on that expert's rows gathered together.  Reads the per-expert counts on the host (one
    sync), so it is for CPU tensors, where that costs nothing, and as a reference.

    With ``act_group`` the GEMM inputs (``hidden``, and ``silu(gate) * up`` once rounded to hidden's dtype) go
    through E4M3 per token per ``act_group`` channels (``fp8.round_activations``) and the GEMMs run in float32:
    the block-FP8 path's numerics, given the experts dequantized (float32 ``w13``/``w2``)."""
    num_tokens, hidden_size = hidden.shape
    top_k = topk_ids.shape[1]
    inter = w13.shape[1] // 2
    out = torch.zeros(num_tokens, hidden_size, dtype=torch.float32, device=hidden.device)
    if num_tokens == 0:
        return out.to(hidden.dtype)
    flat_ids = topk_ids.reshape(-1).to(torch.int64)  # [num_pairs]
    sorted_ids, order = torch.sort(flat_ids, stable=True)  # pairs grouped by expert
    experts, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    token_of_pair = order // top_k  # [num_pairs] in sorted order
    weight_of_pair = topk_weights.reshape(-1).to(torch.float32)[order]
    x = hidden if act_group is None else round_activations(hidden, act_group)  # float32 when rounded
    start = 0
    for expert, count in zip(experts.tolist(), counts.tolist()):
        tokens = token_of_pair[start:start + count]  # [count]
        gate_up = F.linear(x[tokens], w13[expert])  # [count, 2 * inter]
        act = (F.silu(gate_up[:, :inter].float()) * gate_up[:, inter:].float()).to(hidden.dtype)
        if act_group is not None:
            act = round_activations(act, act_group)
        expert_out = F.linear(act, w2[expert])  # [count, hidden]
        # Rounded to the compute dtype after the weighting, as the Triton path stores each pair's row.
        weighted = (expert_out.float() * weight_of_pair[start:start + count, None]).to(hidden.dtype)
        out.index_add_(0, tokens, weighted.float())
        start += count
    return out.to(hidden.dtype)
