"""Llama (and Mistral, SmolLM): pre-norm decoder blocks of grouped-query attention with RoPE and a SwiGLU MLP.

Qwen2 (QKV bias) and Qwen3 (per-head RMSNorm of q and k) are the same network with a switch each; Mixtral and
Qwen3-MoE replace the MLP (``make_mlp``) with a mixture of experts.
"""

from __future__ import annotations

import torch
from torch import nn

from radixlm.config import ModelConfig
from radixlm.core import ForwardBatch
from radixlm.kernels.fp8_activation import FP8Activation
from radixlm.kernels.lora import LoraSegments
from radixlm.layers.activation import SiluAndMul
from radixlm.layers.attention import RadixAttention
from radixlm.layers.layernorm import RMSNorm
from radixlm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from radixlm.layers.rotary import get_rope
from radixlm.mem import KVCacheSpec
from radixlm.models.decoder import CausalLM, DecoderModel, PreNormDecoderLayer


class LlamaMLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``; ``intermediate_size`` defaults to the config's (MoE models size
    their shared experts otherwise), ``reduce_results=False`` leaves the TP all-reduce to the caller.  Under FP8
    ``x`` may arrive quantized as ``input_quant`` (gate_up_proj's) asks, and the SiLU-mul quantizes for down_proj."""

    def __init__(self, config: ModelConfig, intermediate_size: int | None = None, reduce_results: bool = True):
        super().__init__()
        dtype = config.dtype
        inter = intermediate_size or config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inter] * 2, dtype=dtype, quant=config.quant)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, dtype=dtype, reduce_results=reduce_results,
                                           quant=config.quant)
        if config.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r} (only silu)")
        self.act_fn = SiluAndMul()
        self.input_quant = self.gate_up_proj.input_quant

    def forward(self, x: torch.Tensor | FP8Activation, lora: LoraSegments | None = None) -> torch.Tensor:
        h = self.gate_up_proj.lora_silu_mul(x, lora)  # a LoRA decode step: the activation fused with the adapters
        if h is None:
            h = self.act_fn(self.gate_up_proj(x, lora), self.down_proj.input_quant)
        return self.down_proj(h, lora)


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, qkv_bias: bool, qk_norm: bool):
        super().__init__()
        head_dim = config.head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=qkv_bias, dtype=config.dtype,
                                          quant=config.quant)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        self.o_proj = RowParallelLinear(config.num_attention_heads * head_dim, config.hidden_size,
                                        bias=False, dtype=config.dtype, quant=config.quant)
        self.q_norm = RMSNorm(head_dim, config.rms_norm_eps, config.dtype) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, config.rms_norm_eps, config.dtype) if qk_norm else None
        self.rotary_emb = get_rope(head_dim, config.context_length, config.rope_theta, config.rope_scaling)
        self.attn = RadixAttention(self.num_heads, head_dim, head_dim**-0.5, self.num_kv_heads, layer_id,
                                   config.sliding_window, out_quant=self.o_proj.input_quant)
        self.head_dim = head_dim
        self.input_quant = self.qkv_proj.input_quant  # ``hidden`` may arrive quantized for qkv_proj

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor | FP8Activation, fb: ForwardBatch) -> torch.Tensor:
        qkv = self.qkv_proj(hidden, fb.lora)  # [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        # The rotary kernel stores K and V in the cache where the pool lets it (k comes back None): one launch
        kv_out = None if fb.forward_mode.is_idle else self.attn.kv_store_target(fb)
        q, k = self.rotary_emb(positions, q, k, v.view(-1, self.num_kv_heads, self.head_dim), kv_out)
        return self.o_proj(self.attn(q.flatten(1), None if k is None else k.flatten(1), v, fb), fb.lora)


class LlamaForCausalLM(CausalLM):
    qkv_bias: bool | None = None  # None: the config's attention_bias
    qk_norm = False
    stacked_params_mapping = [
        ("qkv_proj", "q_proj", "q"),
        ("qkv_proj", "k_proj", "k"),
        ("qkv_proj", "v_proj", "v"),
        ("gate_up_proj", "gate_proj", 0),
        ("gate_up_proj", "up_proj", 1),
    ]

    def __init__(self, config: ModelConfig):
        qkv_bias = config.attention_bias if self.qkv_bias is None else self.qkv_bias
        super().__init__(config, DecoderModel(config, lambda i: PreNormDecoderLayer(
            config, LlamaAttention(config, i, qkv_bias, self.qk_norm), self.make_mlp(config, i))))

    def make_mlp(self, config: ModelConfig, layer_id: int) -> nn.Module:
        """Layer ``layer_id``'s feed-forward (mixture-of-experts models choose per layer)."""
        return LlamaMLP(config)

    def lora_projections(self) -> list[dict[str, nn.Module]]:
        """Per decoder layer, the projections LoRA adapters modify, by group (``radixlm.lora.pool``).  ValueError
        when a layer's feed-forward is not the dense SwiGLU MLP (a mixture of experts: adapters on experts are not
        supported)."""
        out = []
        for i, layer in enumerate(self.model.layers):
            if type(layer.mlp) is not LlamaMLP:
                raise ValueError(f"LoRA is not supported for {type(self).__name__}: layer {i}'s feed-forward is "
                                 f"{type(layer.mlp).__name__}, not a dense MLP (--enable-lora serves Llama, Mistral, "
                                 f"Qwen2 and dense Qwen3 models)")
            attn, mlp = layer.self_attn, layer.mlp
            out.append({"qkv_proj": attn.qkv_proj, "o_proj": attn.o_proj, "gate_up_proj": mlp.gate_up_proj,
                        "down_proj": mlp.down_proj})
        return out

    def kv_cache_spec(self, dtype: torch.dtype) -> KVCacheSpec:
        """K and V of every layer, this rank's KV heads."""
        attn = self.model.layers[0].self_attn
        return KVCacheSpec.mha(len(self.model.layers), attn.num_kv_heads, attn.head_dim, dtype)


class MistralForCausalLM(LlamaForCausalLM):
    pass
