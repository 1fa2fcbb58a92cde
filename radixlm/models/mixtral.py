"""Mixtral: Mistral's attention with a mixture of experts in every layer.

Each token goes to ``num_experts_per_tok`` (2) of ``num_local_experts`` (8) SwiGLU experts of
``intermediate_size``, weighted by the softmax of the router logits over the chosen experts (the top-k of the
full softmax, renormalised).  Checkpoints name the block ``block_sparse_moe`` and an expert's projections
``w1`` (gate), ``w3`` (up) and ``w2`` (down).
"""

from __future__ import annotations

from torch import nn

from radixlm.config import ModelConfig
from radixlm.layers.moe import EXPERT_PROJ_NAMES, SparseMoeBlock, expert_params_mapping
from radixlm.layers.moe_router import Routing
from radixlm.models.llama import LlamaForCausalLM, MistralForCausalLM


class MixtralForCausalLM(MistralForCausalLM):
    checkpoint_renames = [(".block_sparse_moe.", ".mlp.")]

    def __init__(self, config: ModelConfig):
        self.stacked_params_mapping = (expert_params_mapping(config.hf_config["num_local_experts"],
                                                             EXPERT_PROJ_NAMES["mixtral"])
                                       + LlamaForCausalLM.stacked_params_mapping)
        super().__init__(config)

    def make_mlp(self, config: ModelConfig, layer_id: int) -> nn.Module:
        hf = config.hf_config
        routing = Routing(num_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"], renormalize=True)
        return SparseMoeBlock(config, routing, config.intermediate_size)
