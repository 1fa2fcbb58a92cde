"""Expert routing against a brute-force per-token reference of each family's rule, the routing config checks, and
the expert weights' checkpoint names (HF's per-expert names <-> our stacked parameters, both ways)."""

from __future__ import annotations

import math

import pytest
import torch

from radixlm.layers.moe import EXPERT_PROJ_NAMES, expert_params_mapping
from radixlm.layers.moe_router import Routing, select_experts
from radixlm.models.weights import _checkpoint_name


def brute_force(logits: list[float], r: Routing, bias: list[float] | None) -> dict[int, float]:
    """One token: {expert: weight}, by the rule as written (sorting Python lists)."""
    n = len(logits)
    if r.scoring == "softmax":
        m = max(logits)
        z = sum(math.exp(x - m) for x in logits)
        scores = [math.exp(x - m) / z for x in logits]
    else:
        scores = [1 / (1 + math.exp(-x)) for x in logits]
    choice = [s + (bias[e] if bias else 0.0) for e, s in enumerate(scores)]
    size = n // r.num_groups
    groups = [choice[g * size:(g + 1) * size] for g in range(r.num_groups)]
    rank = [max(g) if r.group_score == "max" else sum(sorted(g)[-2:]) for g in groups]
    kept = sorted(range(r.num_groups), key=lambda g: -rank[g])[: r.topk_groups]
    allowed = [e for e in range(n) if e // size in kept]
    chosen = sorted(allowed, key=lambda e: -choice[e])[: r.top_k]
    weights = {e: scores[e] for e in chosen}
    if r.renormalize:
        total = sum(weights.values())
        weights = {e: w / total for e, w in weights.items()}
    return {e: w * r.scaling_factor for e, w in weights.items()}


ROUTINGS = {
    "mixtral": Routing(num_experts=8, top_k=2, renormalize=True),
    "qwen3_moe_no_norm": Routing(num_experts=16, top_k=4),
    "deepseek_v2_greedy": Routing(num_experts=16, top_k=6, scaling_factor=1.5, fp32_logits=True),
    "deepseek_v2_group_limited": Routing(num_experts=16, top_k=3, num_groups=4, topk_groups=2, scaling_factor=16.0),
    "deepseek_v3": Routing(num_experts=32, top_k=8, scoring="sigmoid", renormalize=True, num_groups=8,
                           topk_groups=4, group_score="top2_sum", scaling_factor=2.5, correction_bias=True),
    "top1": Routing(num_experts=4, top_k=1),
}


@pytest.mark.parametrize("name", sorted(ROUTINGS))
def test_select_experts_matches_brute_force(name):
    r = ROUTINGS[name]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(37, r.num_experts, generator=g, dtype=torch.float64).float() * 2
    bias = (torch.rand(r.num_experts, generator=g) - 0.5) * 0.4 if r.correction_bias else None
    weights, ids = select_experts(logits, r, bias)
    assert weights.dtype == torch.float32 and weights.shape == ids.shape == (37, r.top_k)
    for t in range(37):
        want = brute_force(logits[t].tolist(), r, bias.tolist() if bias is not None else None)
        got = dict(zip(ids[t].tolist(), weights[t].tolist()))
        assert set(got) == set(want)
        for e in want:
            assert got[e] == pytest.approx(want[e], rel=1e-5)


def test_correction_bias_chooses_but_does_not_weigh():
    """A large bias on expert 0 makes every token choose it, with its unbiased sigmoid score as the weight."""
    r = Routing(num_experts=4, top_k=1, scoring="sigmoid", correction_bias=True)
    logits = torch.tensor([[-3.0, 2.0, 1.0, 0.0]])
    weights, ids = select_experts(logits, r, torch.tensor([10.0, 0.0, 0.0, 0.0]))
    assert ids.tolist() == [[0]] and weights.item() == pytest.approx(1 / (1 + math.exp(3.0)))


def test_empty_batch():
    weights, ids = select_experts(torch.empty(0, 8), ROUTINGS["mixtral"])
    assert weights.shape == ids.shape == (0, 2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_experts=8, top_k=9), "num_experts_per_tok"),
    (dict(num_experts=8, top_k=2, num_groups=3), "groups"),
    (dict(num_experts=8, top_k=2, num_groups=4, topk_groups=5), "topk_group"),
    (dict(num_experts=8, top_k=5, num_groups=4, topk_groups=2), "cannot supply"),
    (dict(num_experts=8, top_k=2, scoring="relu"), "scoring"),
])
def test_routing_rejects_bad_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Routing(**kwargs)


def test_from_deepseek():
    v3 = Routing.from_deepseek({"n_routed_experts": 256, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
                                "routed_scaling_factor": 2.5, "norm_topk_prob": True}, default_method="noaux_tc")
    assert (v3.scoring, v3.group_score, v3.correction_bias, v3.renormalize) == ("sigmoid", "top2_sum", True, True)
    lite = Routing.from_deepseek({"n_routed_experts": 64, "num_experts_per_tok": 6, "topk_method": "greedy",
                                  "n_group": 1, "topk_group": 1, "norm_topk_prob": False})
    assert (lite.scoring, lite.num_groups, lite.renormalize, lite.scaling_factor) == ("softmax", 1, False, 1.0)
    with pytest.raises(ValueError, match="topk_method"):
        Routing.from_deepseek({"n_routed_experts": 4, "num_experts_per_tok": 2, "topk_method": "sinkhorn"})


@pytest.mark.parametrize("family", sorted(EXPERT_PROJ_NAMES))
def test_expert_checkpoint_names_round_trip(family):
    """Every HF per-expert name maps to one (parameter, shard), and dummy weights name that shard back the same."""
    gate, up, down = EXPERT_PROJ_NAMES[family]
    mapping = expert_params_mapping(3, EXPERT_PROJ_NAMES[family]) + [("gate_up_proj", "gate_proj", 0),
                                                                     ("gate_up_proj", "up_proj", 1)]
    by_shard: dict[object, list[tuple[str, str]]] = {}
    for param_part, ckpt_part, shard in mapping:
        by_shard.setdefault(shard, []).append((param_part, ckpt_part))
    prefix = "model.layers.5.mlp."
    for e in range(3):
        for proj, param, shard in ((gate, "experts.gate_up_proj", (e, "gate")), (up, "experts.gate_up_proj", (e, "up")),
                                   (down, "experts.down_proj", (e, "down"))):
            ckpt = f"{prefix}experts.{e}.{proj}.weight"
            entry = next(m for m in mapping if f".{m[1]}." in f"{ckpt}.")
            assert (entry[0], entry[2]) == (param, shard)
            assert _checkpoint_name(prefix + param, by_shard[shard]) == ckpt
    # the dense MLP's shards (shared experts) still map as before
    assert _checkpoint_name(prefix + "shared_experts.gate_up_proj.weight", by_shard[0]) == \
        prefix + "shared_experts.gate_proj.weight"
