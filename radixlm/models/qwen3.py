"""Qwen3: Llama with RMSNorm over each head of q and k before RoPE (QK-norm), no QKV bias."""

from radixlm.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
