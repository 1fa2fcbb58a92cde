"""DeepSeek-V2: pre-norm decoder blocks of Multi-head Latent Attention (MLA) and a SwiGLU MLP.

MLA compresses a token's keys and values into one latent ``c`` [kv_lora_rank] shared by all heads, plus one
rotary key ``k_pe`` [qk_rope_head_dim] shared by all heads.  ``kv_b_proj`` holds, per head h, the up-projections
``W_UK[h]`` [qk_nope_head_dim, kv_lora_rank] and ``W_UV[h]`` [v_head_dim, kv_lora_rank]: ``k_nope[h] = W_UK[h] c``
and ``v[h] = W_UV[h] c``.  The absorbed form never builds them:

    q_nope[h] · k_nope[h]  =  (W_UK[h]ᵀ q_nope[h]) · c           q_latent[h] = W_UK[h]ᵀ q_nope[h]   [kv_lora_rank]
    Σ_j p_j v_j[h]         =  W_UV[h] (Σ_j p_j c_j)

so attention is MQA over one KV "head", ``cat(c, k_pe)`` [kv_lora_rank + qk_rope_head_dim], stored once per token
in the MLA pool (V is its latent part, read in place), with queries ``cat(q_latent[h], q_pe[h])``; each head's
output is a latent that ``W_UV[h]`` maps to v_head_dim before ``o_proj``.  Decode, MIXED and TARGET_VERIFY
batches run this form; a long EXTEND batch runs the decompressed one (``mla_extend``: the cached latents are
up-projected into per-head K/V and attention is ordinary causal MHA, 3.4x fewer FLOPs per query-key pair), chosen
per batch by ``mla_extend.use_decompressed``.  Both read and write the same MLA pool.

With ``--enable-fp8-mla-bmm`` the absorbed form's two per-head products run in E4M3 (``radixlm.kernels.fp8_bmm``):
W_UK and W_UV quantized once after loading with one scale per head, the activations (q_nope, the latent attention
output) with one dynamic scale per tensor.  The decompressed form is unchanged (kv_b_proj as loaded).

Tensor parallelism splits the heads: q_proj / q_b_proj and kv_b_proj are column-parallel by head, o_proj
row-parallel; q_a_proj and kv_a_proj_with_mqa are replicated (every rank needs the whole latent), so the KV cache
is the same on every rank.  Data-parallel attention (``--enable-dp-attention``) splits the heads over the
attention group only (``get_attn_tp_group()``, with the embedding and the LM head), so each DP rank keeps the
latents of its own requests; the feed-forward stays sharded over the whole TP group (``PreNormDecoderLayer``
gathers every DP rank's tokens around it).

The feed-forward of layer ``i >= first_k_dense_replace`` is a mixture of experts: ``n_routed_experts`` SwiGLU
experts of ``moe_intermediate_size``, ``num_experts_per_tok`` chosen per token (``Routing.from_deepseek``: V2's
softmax with group-limited greedy choice, V3's sigmoid with a correction bias and grouped top-k), plus
``n_shared_experts`` always-on experts run as one MLP; the first layers are dense.  DeepSeek-V3 is this network
with V3's routing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from radixlm.config import ModelConfig
from radixlm.core import ForwardBatch
from radixlm.distributed import divide, get_attn_tp_group, get_dp_attention
from radixlm.kernels.fp8 import FP8_DTYPE
from radixlm.kernels.fp8_bmm import fp8_bmm, quantize_per_batch
from radixlm.layers import fp8_linear
from radixlm.layers.attention import RadixAttention
from radixlm.layers.layernorm import RMSNorm
from radixlm.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from radixlm.layers.moe import SparseMoeBlock, expert_params_mapping
from radixlm.layers.moe_router import Routing
from radixlm.layers.rotary import get_rope, yarn_softmax_scale_factor
from radixlm.mem import KVCacheSpec
from radixlm.models.decoder import CausalLM, DecoderModel, PreNormDecoderLayer
from radixlm.models.llama import LlamaMLP
from radixlm.models.mla_extend import EXTEND_PATHS, MLADims, prefix_causal_attention, sequence_rows, use_decompressed

# The low-rank norms (q_a_layernorm, kv_a_layernorm) use RMSNorm's default eps in DeepSeek's reference code and in
# transformers, not the config's rms_norm_eps.
LATENT_NORM_EPS = 1e-6


def moe_layers(hf_config: dict[str, Any]) -> list[int]:
    """The layers whose MLP is a mixture of experts: from first_k_dense_replace on, every ``moe_layer_freq``-th,
    when the config has routed experts."""
    if not hf_config.get("n_routed_experts"):
        return []
    first, every = hf_config.get("first_k_dense_replace") or 0, hf_config.get("moe_layer_freq") or 1
    return [i for i in range(first, hf_config["num_hidden_layers"]) if i % every == 0]


def deepseek_mlp(config: ModelConfig, layer_id: int, default_topk_method: str) -> nn.Module:
    """Layer ``layer_id``'s feed-forward: dense SwiGLU, or routed experts plus shared ones."""
    hf = config.hf_config
    if layer_id not in moe_layers(hf):
        return LlamaMLP(config)
    inter = hf["moe_intermediate_size"]
    shared = hf.get("n_shared_experts") or 0
    return SparseMoeBlock(config, Routing.from_deepseek(hf, default_topk_method), inter,
                          LlamaMLP(config, inter * shared, reduce_results=False) if shared else None)


class DeepseekV2Attention(nn.Module):
    """MLA (see the module docstring); this rank's ``num_heads`` of the query heads.  ``extend_path`` (one of
    ``mla_extend.EXTEND_PATHS``) picks the form of EXTEND batches: ``auto`` by the batch, or one form always
    (tests and benchmarks set the attribute to compare the two).  ``fp8_bmm``: the absorbed form's products with
    W_UK and W_UV in FP8, over the buffers ``finish_loading`` fills after loading.  The heads are split over the
    attention group (the TP group unless attention is data-parallel)."""

    def __init__(self, config: ModelConfig, layer_id: int, extend_path: str = "auto", fp8_bmm: bool = False):
        super().__init__()
        if extend_path not in EXTEND_PATHS:
            raise ValueError(f"unknown MLA extend path {extend_path!r}; known: {', '.join(EXTEND_PATHS)}")
        self.extend_path = extend_path
        self.fp8_bmm = fp8_bmm
        hf, dtype, hidden, quant = config.hf_config, config.dtype, config.hidden_size, config.quant
        self.dtype = dtype
        self.q_lora_rank = hf.get("q_lora_rank")
        self.kv_lora_rank = hf["kv_lora_rank"]
        self.qk_nope_head_dim, self.qk_rope_head_dim = hf["qk_nope_head_dim"], hf["qk_rope_head_dim"]
        self.v_head_dim = hf["v_head_dim"]
        qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        heads = config.num_attention_heads
        tp = get_attn_tp_group()
        self.num_heads = divide(heads, tp.size, "number of attention heads")
        bias = config.attention_bias  # on the a-projections and o_proj, as in transformers
        if self.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(hidden, [heads * qk_head_dim], dtype=dtype, quant=quant, tp=tp)
        else:
            self.q_a_proj = ReplicatedLinear(hidden, self.q_lora_rank, bias=bias, dtype=dtype, quant=quant)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS, dtype)
            self.q_b_proj = ColumnParallelLinear(self.q_lora_rank, [heads * qk_head_dim], dtype=dtype, quant=quant,
                                                 tp=tp)
        self.kv_a_proj_with_mqa = ReplicatedLinear(hidden, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias,
                                                   dtype=dtype, quant=quant)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS, dtype)
        # Rows: per head, W_UK's qk_nope_head_dim rows then W_UV's v_head_dim rows; split by head over ranks.
        self.kv_b_proj = ColumnParallelLinear(self.kv_lora_rank, [heads * (self.qk_nope_head_dim + self.v_head_dim)],
                                              dtype=dtype, quant=quant, tp=tp)
        self.o_proj = RowParallelLinear(heads * self.v_head_dim, hidden, bias=bias, dtype=dtype, quant=quant, tp=tp)
        # DeepSeek rotates interleaved pairs; a V3 config with rope_interleave=false rotates halves (transformers)
        self.rotary_emb = get_rope(self.qk_rope_head_dim, config.context_length, config.rope_theta,
                                   config.rope_scaling, is_neox_style=not hf.get("rope_interleave", True))
        # The logits are those of the decompressed heads, so the scale is theirs (with YaRN's correction).
        scaling = qk_head_dim**-0.5 * yarn_softmax_scale_factor(config.rope_scaling)
        self.attn = RadixAttention(self.num_heads, self.kv_lora_rank + self.qk_rope_head_dim, scaling,
                                   num_kv_heads=1, layer_id=layer_id, v_head_dim=self.kv_lora_rank)
        self.dims = MLADims(self.kv_lora_rank, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim)
        if fp8_bmm:
            # Allocated with the parameters (before the KV cache is sized); filled by finish_loading.
            # [num_heads, kv_lora_rank, qk_nope_head_dim]: W_UK[h]^T, K-contiguous as the kernel reads it
            self.register_buffer("w_uk_fp8", torch.empty(self.num_heads, self.kv_lora_rank, self.qk_nope_head_dim,
                                                         dtype=FP8_DTYPE), persistent=False)
            # [num_heads, v_head_dim, kv_lora_rank]
            self.register_buffer("w_uv_fp8", torch.empty(self.num_heads, self.v_head_dim, self.kv_lora_rank,
                                                         dtype=FP8_DTYPE), persistent=False)
            self.register_buffer("w_uk_scale", torch.empty(self.num_heads, dtype=torch.float32), persistent=False)
            self.register_buffer("w_uv_scale", torch.empty(self.num_heads, dtype=torch.float32), persistent=False)

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W_UK [num_heads, qk_nope_head_dim, kv_lora_rank], W_UV [num_heads, v_head_dim, kv_lora_rank])``:
        views of this rank's kv_b_proj weight (of its dequantized copy when it is FP8)."""
        return self._split_kv_b(self.kv_b_proj.dequantized_weight(self.dtype))

    def _split_kv_b(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = w.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return w.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)

    def finish_loading(self) -> None:
        """With ``fp8_bmm``, once the checkpoint is in: W_UK and W_UV to E4M3 with one float32 scale per head
        (``fp8_bmm.quantize_per_batch``), from kv_b_proj's weight in float32: the checkpoint's values (an online
        ``--quantization fp8`` quantizes kv_b_proj after this), or a block-FP8 checkpoint's dequantized ones
        (rounded again, to the head's scale)."""
        if not self.fp8_bmm:
            return
        w = self.kv_b_proj.weight
        w = fp8_linear.dequantize(self.kv_b_proj, torch.float32) if w.dtype == FP8_DTYPE else w.float()
        w_uk, w_uv = self._split_kv_b(w)
        for name, weight in (("w_uk", w_uk.transpose(1, 2)), ("w_uv", w_uv)):
            w_q, scale = quantize_per_batch(weight)
            getattr(self, f"{name}_fp8").copy_(w_q)
            getattr(self, f"{name}_scale").copy_(scale)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        if self.q_lora_rank is None:
            q = self.q_proj(hidden)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        q = q.view(-1, self.num_heads, self.qk_nope_head_dim + self.qk_rope_head_dim)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        # [num_tokens, kv_lora_rank], [num_tokens, qk_rope_head_dim]
        latent, k_pe = self.kv_a_proj_with_mqa(hidden).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        # [num_tokens, num_heads, qk_rope_head_dim], [num_tokens, 1, qk_rope_head_dim]
        q_pe, k_pe = self.rotary_emb(positions, q_pe, k_pe.unsqueeze(1))
        k = torch.cat([latent.unsqueeze(1), k_pe], dim=-1)  # [num_tokens, 1, kv_lora_rank + qk_rope_head_dim]
        if use_decompressed(fb, self.extend_path, self.dims, self.num_heads):
            return self.o_proj(self.decompressed_attention(q_nope, q_pe, k, fb).flatten(1))

        if self.fp8_bmm:
            q_latent = fp8_bmm(q_nope, self.w_uk_fp8, self.w_uk_scale)  # [num_tokens, num_heads, kv_lora_rank]
        else:
            w_uk, w_uv = self.absorbed_weights()
            q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)
        q = torch.cat([q_latent, q_pe], dim=-1)  # [num_tokens, num_heads, kv_lora_rank + qk_rope_head_dim]
        out = self.attn(q.flatten(1), k.flatten(1), None, fb)  # [num_tokens, num_heads * kv_lora_rank]
        out = out.view(-1, self.num_heads, self.kv_lora_rank)
        # [num_tokens, num_heads, v_head_dim]
        if self.fp8_bmm:
            out = fp8_bmm(out, self.w_uv_fp8, self.w_uv_scale)
        else:
            out = torch.bmm(out.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)
        return self.o_proj(out.flatten(1))

    def decompressed_attention(
        self,
        q_nope: torch.Tensor,  # [num_tokens, num_heads, qk_nope_head_dim]
        q_pe: torch.Tensor,  # [num_tokens, num_heads, qk_rope_head_dim], rotated
        latent_kv: torch.Tensor,  # [num_tokens, 1, kv_lora_rank + qk_rope_head_dim]: what the pool stores
        fb: ForwardBatch,
    ) -> torch.Tensor:  # [num_tokens, num_heads, v_head_dim]
        """EXTEND in the decompressed form: store the new latents, gather every request's whole sequence from
        the pool and up-project it with kv_b_proj into per-head K (``[W_UK c ; k_pe]``) and V (``W_UV c``)."""
        fb.kv_pool.set_kv(self.attn.layer_id, fb.out_cache_loc, latent_kv, None)
        seqs = sequence_rows(fb)
        layer_id, pool = self.attn.layer_id, fb.kv_pool
        # [total, 576], dequantized if the cache is FP8
        rows = pool.read_rows(pool.get_kv_buffer(layer_id)[0], seqs.slots, layer_id, dtype=q_nope.dtype)[:, 0]
        latent, k_pe = rows.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(latent).view(-1, self.num_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)  # [total, num_heads, 128 | 128]
        k = torch.cat([k_nope, k_pe.unsqueeze(1).expand(-1, self.num_heads, -1)], dim=-1)  # [total, heads, 192]
        q = torch.cat([q_nope, q_pe], dim=-1)  # [num_tokens, num_heads, 192]
        return prefix_causal_attention(q, k, v, seqs, fb, self.attn.scaling, fb.attn_backend.name == "triton")


class DeepseekV2ForCausalLM(CausalLM):
    default_topk_method = "greedy"  # when the config names none

    def __init__(self, config: ModelConfig):
        hf = config.hf_config
        if hf.get("mlp_bias"):
            raise NotImplementedError("DeepSeek-V2 with mlp_bias is not supported")
        self.stacked_params_mapping = (expert_params_mapping(hf.get("n_routed_experts") or 0)
                                       + [("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1)])
        dp = get_dp_attention()
        super().__init__(config, DecoderModel(config, lambda i: PreNormDecoderLayer(
            config, DeepseekV2Attention(config, i, fp8_bmm=config.enable_fp8_mla_bmm),
            deepseek_mlp(config, i, self.default_topk_method), dp), vocab_tp=get_attn_tp_group()))

    def kv_cache_spec(self, dtype: torch.dtype) -> KVCacheSpec:
        """One latent + rope key per token and layer, the same on every rank of an attention group."""
        attn = self.model.layers[0].self_attn
        return KVCacheSpec.mla(len(self.model.layers), attn.kv_lora_rank, attn.qk_rope_head_dim, dtype)


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    """DeepSeek-V3/R1 (BF16 weights): V2's network, routed with ``noaux_tc``."""

    default_topk_method = "noaux_tc"
