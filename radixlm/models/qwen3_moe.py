"""Qwen3-MoE: Qwen3's attention (QK-norm) with mixture-of-experts feed-forward layers.

Each MoE layer routes a token to ``num_experts_per_tok`` of ``num_experts`` SwiGLU experts by the softmax of
the router logits (the chosen weights renormalised when ``norm_topk_prob``); no shared experts.  Layers listed
in ``mlp_only_layers``, or off the ``decoder_sparse_step`` rhythm, keep a dense MLP.
"""

from __future__ import annotations

from torch import nn

from radixlm.config import ModelConfig
from radixlm.layers.moe import SparseMoeBlock, expert_params_mapping
from radixlm.layers.moe_router import Routing
from radixlm.models.llama import LlamaForCausalLM, LlamaMLP
from radixlm.models.qwen3 import Qwen3ForCausalLM


def num_experts(hf_config: dict) -> int:
    """Qwen's ``num_experts`` (transformers 5 writes it as ``num_local_experts``)."""
    return hf_config.get("num_experts") or hf_config.get("num_local_experts") or 0


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    def __init__(self, config: ModelConfig):
        self.stacked_params_mapping = (expert_params_mapping(num_experts(config.hf_config))
                                       + LlamaForCausalLM.stacked_params_mapping)
        super().__init__(config)

    def make_mlp(self, config: ModelConfig, layer_id: int) -> nn.Module:
        hf = config.hf_config
        sparse = num_experts(hf) > 0 and layer_id not in (hf.get("mlp_only_layers") or []) \
            and (layer_id + 1) % (hf.get("decoder_sparse_step") or 1) == 0
        if not sparse:
            return LlamaMLP(config)
        routing = Routing(num_experts=num_experts(hf), top_k=hf["num_experts_per_tok"],
                          renormalize=bool(hf.get("norm_topk_prob")))
        return SparseMoeBlock(config, routing, hf["moe_intermediate_size"])
