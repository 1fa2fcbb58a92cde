"""Mixture-of-experts feed-forward layers: the routed experts' weights (``FusedMoE``) and the sparse block that
routes tokens to them and adds the shared experts (``SparseMoeBlock``).

Tensor parallelism splits every expert's intermediate dimension over the ranks (the gate/up rows and the down
columns of each expert, like a dense MLP), so every rank runs every expert on every token it routes and holds a
partial sum of the output; routed and shared experts' partial sums are added before the block's single
all-reduce.
"""

from __future__ import annotations

import torch
from torch import nn

from radixlm.config import ModelConfig
from radixlm.distributed import divide, get_tp_group
from radixlm.kernels.fused_moe import fused_experts
from radixlm.layers.moe_router import Routing, TopKRouter

# Checkpoint names of an expert's three projections, by family: (gate, up, down).
EXPERT_PROJ_NAMES = {
    "llama": ("gate_proj", "up_proj", "down_proj"),  # DeepSeek, Qwen3-MoE
    "mixtral": ("w1", "w3", "w2"),
}


def expert_params_mapping(num_experts: int, names: tuple[str, str, str] = EXPERT_PROJ_NAMES["llama"]
                          ) -> list[tuple[str, str, object]]:
    """Entries for ``load_named_weights``' stacked mapping: checkpoint ``experts.{e}.{gate,up,down}.weight`` ->
    our stacked ``experts.gate_up_proj`` (shards ``(e, "gate")``, ``(e, "up")``) and ``experts.down_proj`` (shard
    ``(e, "down")``)."""
    gate, up, down = names
    mapping: list[tuple[str, str, object]] = []
    for e in range(num_experts):
        mapping += [("experts.gate_up_proj", f"experts.{e}.{gate}.weight", (e, "gate")),
                    ("experts.gate_up_proj", f"experts.{e}.{up}.weight", (e, "up")),
                    ("experts.down_proj", f"experts.{e}.{down}.weight", (e, "down"))]
    return mapping


class FusedMoE(nn.Module):
    """The routed experts as two stacked weights, this rank's slice of each expert's intermediate dimension:

    - ``gate_up_proj`` [num_experts, 2 * inter / tp, hidden]: gate rows, then up rows
    - ``down_proj``    [num_experts, hidden, inter / tp]

    ``forward`` returns this rank's partial sum (the caller all-reduces)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, dtype: torch.dtype):
        super().__init__()
        self.tp = get_tp_group()
        self.num_experts = num_experts
        self.local_inter = divide(intermediate_size, self.tp.size, "MoE intermediate size")
        inter, local = intermediate_size, self.local_inter
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * local, hidden_size, dtype=dtype),
                                         requires_grad=False)
        self.gate_up_proj.weight_loader = self._load_gate_up
        self.gate_up_proj.checkpoint_shapes = {(e, part): (inter, hidden_size)
                                               for e in range(num_experts) for part in ("gate", "up")}
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, local, dtype=dtype), requires_grad=False)
        self.down_proj.weight_loader = self._load_down
        self.down_proj.checkpoint_shapes = {(e, "down"): (hidden_size, inter) for e in range(num_experts)}

    def _load_gate_up(self, param: nn.Parameter, loaded: torch.Tensor, shard: tuple[int, str]) -> None:
        expert, part = shard
        rows = loaded.narrow(0, self.tp.rank * self.local_inter, self.local_inter)
        offset = 0 if part == "gate" else self.local_inter
        param.data[expert].narrow(0, offset, self.local_inter).copy_(rows)

    def _load_down(self, param: nn.Parameter, loaded: torch.Tensor, shard: tuple[int, str]) -> None:
        expert, _ = shard
        param.data[expert].copy_(loaded.narrow(1, self.tp.rank * self.local_inter, self.local_inter))

    def forward(self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """``hidden`` [num_tokens, hidden], ``topk_*`` [num_tokens, top_k] -> partial output [num_tokens, hidden]."""
        return fused_experts(hidden, self.gate_up_proj, self.down_proj, topk_weights, topk_ids)


class SparseMoeBlock(nn.Module):
    """``sum_k w_k * expert_{id_k}(x) + shared_experts(x)``: the router (``gate``), the routed ``experts`` and,
    for DeepSeek, ``shared_experts`` (a module every token goes through, returning its partial sum un-reduced),
    with one all-reduce."""

    def __init__(self, config: ModelConfig, routing: Routing, expert_intermediate_size: int,
                 shared_experts: nn.Module | None = None):
        super().__init__()
        if config.quant is not None:
            raise NotImplementedError("FP8 mixture-of-experts weights (an FP8 checkpoint or --quantization fp8 on an "
                                      "MoE model) are not supported yet; dense FP8 models are")
        self.tp = get_tp_group()
        self.gate = TopKRouter(config.hidden_size, routing, config.dtype)
        self.experts = FusedMoE(routing.num_experts, config.hidden_size, expert_intermediate_size, config.dtype)
        self.shared_experts = shared_experts

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        topk_weights, topk_ids = self.gate(hidden)  # [num_tokens, top_k] each
        out = self.experts(hidden, topk_weights, topk_ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden)
        return self.tp.all_reduce(out)
