"""``radixlm.kernels.moe_routing.grouped_topk_sigmoid`` (DeepSeek-V3's routing in one Triton kernel, under the
interpreter without CUDA) and the router's torch code (``select_experts``) against a per-token reference written
from the definition."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported: decoration picks the mode

import pytest  # noqa: E402

from radixlm.kernels.moe_routing import grouped_topk_sigmoid  # noqa: E402
from radixlm.layers.moe_router import Routing, select_experts  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (num_experts, top_k, n_group, topk_group): V3's own, one group, groups that are not powers of two
SHAPES = [(256, 8, 8, 4), (16, 4, 1, 1), (24, 5, 4, 2), (64, 6, 8, 3)]


def reference(logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
              scale: float, renormalize: bool) -> tuple[list[list[float]], list[list[int]]]:
    """One token at a time, with sorted lists."""
    scores = logits.sigmoid()
    choice = scores + bias
    size = logits.shape[1] // n_group
    all_weights, all_ids = [], []
    for t in range(logits.shape[0]):
        c = choice[t].tolist()
        group_score = [sum(sorted(c[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(n_group)]
        kept = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
        candidates = [e for g in kept for e in range(g * size, (g + 1) * size)]
        ids = sorted(candidates, key=lambda e: -c[e])[:top_k]
        weights = [scores[t, e].item() for e in ids]
        if renormalize:
            weights = [w / sum(weights) for w in weights]
        all_weights.append([w * scale for w in weights])
        all_ids.append(ids)
    return all_weights, all_ids


@pytest.mark.parametrize("num_experts,top_k,n_group,topk_group", SHAPES)
@pytest.mark.parametrize("renormalize", [True, False])
def test_grouped_topk_sigmoid(num_experts, top_k, n_group, topk_group, renormalize) -> None:
    gen = torch.Generator().manual_seed(num_experts + top_k)
    logits = 2 * torch.randn(7, num_experts, generator=gen)
    bias = 0.1 * torch.randn(num_experts, generator=gen)
    args = (top_k, n_group, topk_group, 2.5, renormalize)
    expected_weights, expected_ids = reference(logits, bias, *args)
    routing = Routing(num_experts=num_experts, top_k=top_k, scoring="sigmoid", renormalize=renormalize,
                      num_groups=n_group, topk_groups=topk_group, group_score="top2_sum", scaling_factor=2.5,
                      correction_bias=True)
    weights, ids = select_experts(logits, routing, bias)  # the torch code (CPU tensors)
    assert ids.tolist() == expected_ids
    torch.testing.assert_close(weights, torch.tensor(expected_weights), rtol=1e-5, atol=1e-6)
    weights, ids = grouped_topk_sigmoid(logits.to(DEVICE), bias.to(DEVICE), *args)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert ids.cpu().tolist() == expected_ids
    torch.testing.assert_close(weights.cpu(), torch.tensor(expected_weights), rtol=1e-5, atol=1e-6)


def test_no_tokens_and_bad_groups() -> None:
    weights, ids = grouped_topk_sigmoid(torch.zeros(0, 16), torch.zeros(16), 2, 4, 2, 1.0, True)
    assert weights.shape == ids.shape == (0, 2)
    with pytest.raises(ValueError):
        grouped_topk_sigmoid(torch.zeros(1, 16), torch.zeros(16), 9, 4, 2, 1.0, True)  # 2 groups of 4 < 9
