"""Qwen2 / Qwen2.5: Llama with a bias on the Q, K and V projections."""

from radixlm.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True
