"""DeepSeek-V3's grouped top-k routing (``noaux_tc``, see ``radixlm.layers.moe_router``) in one Triton program per
token, instead of the dozen torch kernels of ``select_experts`` (sigmoid, add, topk, sum, topk, scatter,
masked_fill, topk, gather, sum, div, mul); no host reads, so it runs inside CUDA graphs.

The token's scores are held as a [groups, experts per group] tile (both padded to powers of two, padding at
-inf), so a group's two best scores are row reductions.  Groups and experts are then picked one at a time by
``max`` + lowest index of the maximum (``topk_group`` and ``top_k`` are small), which also gives torch.topk's
decreasing order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl



@triton.jit
def _grouped_topk_kernel(
    logits_ptr, bias_ptr, weights_ptr, ids_ptr, stride_t, scaling, eps,
    GROUP_SIZE: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, TOP_K: tl.constexpr,
    RENORMALIZE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    groups = tl.arange(0, BLOCK_G)
    within = tl.arange(0, BLOCK_J)
    expert = groups[:, None] * GROUP_SIZE + within[None, :]  # [BLOCK_G, BLOCK_J]
    valid = (groups < N_GROUP)[:, None] & (within < GROUP_SIZE)[None, :]
    neg_inf = float("-inf")
    logits = tl.load(logits_ptr + token * stride_t + expert, mask=valid, other=0.0).to(tl.float32)
    scores = tl.sigmoid(logits)
    choice = tl.where(valid, scores + tl.load(bias_ptr + expert, mask=valid, other=0.0).to(tl.float32), neg_inf)

    # A group's score: its two best biased scores summed (the best removed by index, so ties count twice).
    best = tl.max(choice, axis=1)  # [BLOCK_G]
    best_at = tl.min(tl.where(choice == best[:, None], within[None, :], BLOCK_J), axis=1)
    second = tl.max(tl.where(within[None, :] == best_at[:, None], neg_inf, choice), axis=1)
    group_score = tl.where(groups < N_GROUP, best + second, neg_inf)
    kept = groups < 0  # [BLOCK_G] all False
    for _ in tl.static_range(TOPK_GROUP):
        top = tl.max(group_score, axis=0)
        pick = tl.min(tl.where(group_score == top, groups, BLOCK_G), axis=0)
        kept = kept | (groups == pick)
        group_score = tl.where(groups == pick, neg_inf, group_score)
    choice = tl.where(kept[:, None], choice, neg_inf)

    slots = tl.arange(0, BLOCK_K)
    ids = tl.zeros((BLOCK_K,), dtype=tl.int32)
    weights = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        top = tl.max(tl.max(choice, axis=1), axis=0)
        pick = tl.min(tl.min(tl.where(choice == top, expert, N_GROUP * GROUP_SIZE), axis=1), axis=0)
        ids = tl.where(slots == k, pick, ids)
        # (padding lanes alias the next group's expert numbers, hence ``valid``)
        score = tl.sum(tl.sum(tl.where(valid & (expert == pick), scores, 0.0), axis=1), axis=0)
        weights = tl.where(slots == k, score, weights)
        choice = tl.where(expert == pick, neg_inf, choice)
    if RENORMALIZE:
        weights = weights / (tl.sum(weights, axis=0) + eps)
    out = token * TOP_K + slots
    tl.store(weights_ptr + out, weights * scaling, mask=slots < TOP_K)
    tl.store(ids_ptr + out, ids, mask=slots < TOP_K)


def grouped_topk_sigmoid(
    router_logits: torch.Tensor,  # [num_tokens, num_experts] float32
    bias: torch.Tensor,  # [num_experts] e_score_correction_bias
    top_k: int, n_group: int, topk_group: int, routed_scaling_factor: float, renormalize: bool,
    renorm_eps: float = 1e-20,  # added to the sum before renormalising: an all-zero choice gives zeros, not NaN
) -> tuple[torch.Tensor, torch.Tensor]:  # weights [num_tokens, top_k] float32, ids [num_tokens, top_k] int32
    """Experts in decreasing order of biased score.  Needs ``num_experts % n_group == 0``, groups of at least
    two experts, and ``topk_group`` groups holding at least ``top_k`` experts."""
    num_tokens, num_experts = router_logits.shape
    if num_experts % n_group or num_experts // n_group < 2 or topk_group * (num_experts // n_group) < top_k:
        raise ValueError(f"{num_experts} experts in {n_group} groups (keep {topk_group}) cannot give top-{top_k}")
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=router_logits.device)
    if num_tokens == 0:
        return weights, ids
    if router_logits.stride(1) != 1:
        router_logits = router_logits.contiguous()
    group_size = num_experts // n_group
    _grouped_topk_kernel[(num_tokens,)](
        router_logits, bias.contiguous(), weights, ids, router_logits.stride(0), routed_scaling_factor, renorm_eps,
        GROUP_SIZE=group_size, N_GROUP=n_group, TOPK_GROUP=topk_group, TOP_K=top_k, RENORMALIZE=renormalize,
        BLOCK_G=triton.next_power_of_2(n_group), BLOCK_J=triton.next_power_of_2(group_size),
        BLOCK_K=triton.next_power_of_2(top_k), num_warps=4 if num_experts <= 256 else 8,
    )
    return weights, ids
