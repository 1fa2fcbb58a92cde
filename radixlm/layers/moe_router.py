"""Top-k expert routing: which experts each token goes to, and with what weights.

The families differ only in a few switches (``Routing``):

- Mixtral, Qwen3-MoE: softmax over all experts, the top-k, renormalised to sum to one (Qwen3: if
  ``norm_topk_prob``).
- DeepSeek-V2 (``topk_method`` greedy / group_limited_greedy): softmax; with groups, only experts in the
  ``topk_group`` groups whose best expert scores highest may be chosen; weights times ``routed_scaling_factor``.
- DeepSeek-V3 (``noaux_tc``): sigmoid scores; a learned per-expert bias (``e_score_correction_bias``) is added
  for *choosing* only (groups ranked by the sum of their two best biased scores), the weights are the unbiased
  scores of the chosen experts, renormalised, times ``routed_scaling_factor``.

Everything is plain tensor code on the device (no host reads), so routing runs inside CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from radixlm.layers.linear import default_weight_loader, linear

RENORM_EPS = 1e-20  # added to the chosen weights' sum: an all-zero choice gives zeros, not NaN


@dataclass(frozen=True)
class Routing:
    """How a router turns logits into (weights, expert ids)."""

    num_experts: int
    top_k: int
    scoring: str = "softmax"  # "softmax" or "sigmoid"
    renormalize: bool = False  # chosen weights divided by their sum
    num_groups: int = 1  # experts are split into this many equal groups...
    topk_groups: int = 1  # ...of which only the best ``topk_groups`` may be chosen from
    group_score: str = "max"  # a group's rank: its best score ("max") or its two best summed ("top2_sum")
    scaling_factor: float = 1.0  # multiplies the final weights
    correction_bias: bool = False  # a learned bias added to the scores for choosing only
    fp32_logits: bool = False  # compute the router logits in float32 (DeepSeek), else in the model dtype

    def __post_init__(self) -> None:
        if self.scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"unsupported expert scoring function {self.scoring!r} (softmax or sigmoid)")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"num_experts_per_tok ({self.top_k}) must be in [1, {self.num_experts}]")
        if self.num_experts % self.num_groups:
            raise ValueError(f"{self.num_experts} experts do not split into {self.num_groups} groups")
        if not 1 <= self.topk_groups <= self.num_groups:
            raise ValueError(f"topk_group ({self.topk_groups}) must be in [1, n_group={self.num_groups}]")
        if self.topk_groups * (self.num_experts // self.num_groups) < self.top_k:
            raise ValueError(f"topk_group={self.topk_groups} groups of {self.num_experts // self.num_groups} "
                             f"experts cannot supply {self.top_k} experts per token")

    @classmethod
    def from_deepseek(cls, hf: dict[str, Any], default_method: str = "greedy") -> "Routing":
        """DeepSeek-V2/V3 configs (``topk_method``: greedy, group_limited_greedy or noaux_tc; transformers' V3
        config has no such field and always means noaux_tc)."""
        method = hf.get("topk_method") or default_method
        experts, top_k = hf["n_routed_experts"], hf["num_experts_per_tok"]
        common = dict(num_experts=experts, top_k=top_k, scaling_factor=float(hf.get("routed_scaling_factor") or 1.0),
                      fp32_logits=True)
        if method == "greedy":
            return cls(**common, renormalize=bool(hf.get("norm_topk_prob")) and top_k > 1)
        if method == "group_limited_greedy":
            return cls(**common, renormalize=bool(hf.get("norm_topk_prob")) and top_k > 1,
                       num_groups=hf["n_group"], topk_groups=hf["topk_group"])
        if method == "noaux_tc":
            if (hf.get("scoring_func") or "sigmoid") != "sigmoid":
                raise ValueError(f"noaux_tc routing with scoring_func={hf['scoring_func']!r} is not supported")
            return cls(**common, scoring="sigmoid", renormalize=bool(hf.get("norm_topk_prob")),
                       num_groups=hf["n_group"], topk_groups=hf["topk_group"], group_score="top2_sum",
                       correction_bias=True)
        raise ValueError(f"unsupported DeepSeek topk_method {method!r} (greedy, group_limited_greedy, noaux_tc)")


def _fused_kernel_applies(routing: Routing, bias: torch.Tensor | None) -> bool:
    """DeepSeek-V3's routing has a one-launch Triton kernel (``kernels/moe_routing.py``)."""
    return (routing.scoring == "sigmoid" and routing.group_score == "top2_sum" and bias is not None
            and routing.num_experts // routing.num_groups >= 2)


def select_experts(logits: torch.Tensor, routing: Routing, bias: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits`` [num_tokens, num_experts] -> (weights [num_tokens, top_k] float32, ids [num_tokens, top_k]
    int64, or int32 from the CUDA kernel)."""
    logits = logits.float()
    if logits.is_cuda and _fused_kernel_applies(routing, bias):
        from radixlm.kernels.moe_routing import grouped_topk_sigmoid

        return grouped_topk_sigmoid(logits, bias, routing.top_k, routing.num_groups, routing.topk_groups,
                                    routing.scaling_factor, routing.renormalize, RENORM_EPS)
    return select_experts_torch(logits, routing, bias)


def select_experts_torch(logits: torch.Tensor, routing: Routing, bias: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``select_experts`` in torch ops, for every routing (the CPU path and the kernel's reference)."""
    logits = logits.float()
    scores = logits.softmax(dim=-1) if routing.scoring == "softmax" else logits.sigmoid()
    choice = scores if bias is None else scores + bias.float()
    if routing.num_groups > 1:
        grouped = choice.view(-1, routing.num_groups, routing.num_experts // routing.num_groups)
        if routing.group_score == "max":
            group_scores = grouped.amax(dim=-1)
        else:
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        keep = group_scores.topk(routing.topk_groups, dim=-1).indices  # [num_tokens, topk_groups]
        allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        choice = choice.masked_fill(~allowed.unsqueeze(-1).expand_as(grouped).reshape_as(choice), float("-inf"))
    ids = choice.topk(routing.top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if routing.renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + RENORM_EPS)
    if routing.scaling_factor != 1.0:
        weights = weights * routing.scaling_factor
    return weights, ids


class TopKRouter(nn.Module):
    """The gate: ``weight`` [num_experts, hidden] (replicated on every rank: each needs every token's choice),
    plus DeepSeek-V3's ``e_score_correction_bias`` [num_experts] when the routing uses one."""

    def __init__(self, hidden_size: int, routing: Routing, dtype: torch.dtype):
        super().__init__()
        self.routing = routing
        # kept in float32 when the logits are (converted once at load, not every step)
        weight_dtype = torch.float32 if routing.fp32_logits else dtype
        self.weight = nn.Parameter(torch.empty(routing.num_experts, hidden_size, dtype=weight_dtype),
                                   requires_grad=False)
        self.weight.weight_loader = default_weight_loader
        self.e_score_correction_bias = None
        if routing.correction_bias:
            # float32 in DeepSeek-V3's checkpoints: the bias separates scores that differ in late digits
            self.e_score_correction_bias = nn.Parameter(torch.empty(routing.num_experts, dtype=torch.float32),
                                                        requires_grad=False)
            self.e_score_correction_bias.weight_loader = default_weight_loader

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``hidden`` [num_tokens, hidden] -> (weights [num_tokens, top_k] float32, ids [num_tokens, top_k])."""
        if self.routing.fp32_logits:
            logits = torch.nn.functional.linear(hidden.float(), self.weight)
        else:
            logits = linear(hidden, self.weight)
        return select_experts(logits, self.routing, self.e_score_correction_bias)
