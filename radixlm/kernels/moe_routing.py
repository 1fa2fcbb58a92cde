"""DeepSeek-V3's grouped top-k routing (``noaux_tc``) in one kernel: ``grouped_topk_sigmoid``.

Per token: sigmoid scores of the router logits; a per-expert correction bias added for *choosing* only; the
experts split into ``n_group`` equal groups ranked by the sum of their two best biased scores; the best
``topk_group`` groups kept; the ``top_k`` best biased scores among their experts chosen; the weights are the
chosen experts' unbiased scores, optionally renormalised to sum to one, times ``routed_scaling_factor``.

In torch that is a dozen kernels (sigmoid, add, view/topk, sum, topk, scatter, masked_fill, topk, gather, sum,
div, mul); the Triton kernel does it in one launch with one program per token.  Both run on the device only,
without host reads, so either can be captured in a CUDA graph.  ``grouped_topk_sigmoid`` picks Triton for CUDA
tensors and the torch code otherwise (imported on first CUDA call: CPU-only installs may lack triton).
"""

from __future__ import annotations

import torch

# Added to the sum before renormalising, so an all-zero choice gives zeros rather than NaN.
RENORM_EPS = 1e-20


def grouped_topk_sigmoid(
    router_logits: torch.Tensor,  # [num_tokens, num_experts] float32
    bias: torch.Tensor,  # [num_experts] e_score_correction_bias
    top_k: int, n_group: int, topk_group: int, routed_scaling_factor: float, renormalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # weights [num_tokens, top_k] float32, ids [num_tokens, top_k] int32
    """Experts in decreasing order of biased score.  Needs ``num_experts % n_group == 0``, groups of at least
    two experts, and ``topk_group`` groups holding at least ``top_k`` experts."""
    num_experts = router_logits.shape[-1]
    if num_experts % n_group or num_experts // n_group < 2 or topk_group * (num_experts // n_group) < top_k:
        raise ValueError(f"{num_experts} experts in {n_group} groups (keep {topk_group}) cannot give top-{top_k}")
    if router_logits.is_cuda:
        from radixlm.kernels.moe_routing_triton import grouped_topk_sigmoid_triton

        return grouped_topk_sigmoid_triton(router_logits, bias, top_k, n_group, topk_group, routed_scaling_factor,
                                           renormalize)
    return grouped_topk_sigmoid_torch(router_logits, bias, top_k, n_group, topk_group, routed_scaling_factor,
                                      renormalize)


def grouped_topk_sigmoid_torch(
    router_logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
    routed_scaling_factor: float, renormalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``grouped_topk_sigmoid`` in torch ops (the CPU path and the reference)."""
    num_tokens, num_experts = router_logits.shape
    scores = router_logits.float().sigmoid()  # [num_tokens, num_experts]
    choice = scores + bias.float()
    grouped = choice.view(num_tokens, n_group, num_experts // n_group)
    group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [num_tokens, n_group]
    keep = group_scores.topk(topk_group, dim=-1).indices  # [num_tokens, topk_group]
    allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
    choice = grouped.masked_fill(~allowed.unsqueeze(-1), float("-inf")).view(num_tokens, num_experts)
    ids = choice.topk(top_k, dim=-1).indices  # [num_tokens, top_k], decreasing biased score
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + RENORM_EPS)
    return weights * routed_scaling_factor, ids.to(torch.int32)
