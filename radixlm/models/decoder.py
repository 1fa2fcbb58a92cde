"""What every decoder-only model here shares: the pre-norm residual block, the stack of blocks between the token
embedding and the final norm, and the causal-LM wrapper (vocab-parallel LM head, logits, weight loading).

A model file supplies its attention and MLP modules and its KV layout; parameter names follow the HF checkpoints
(``model.embed_tokens``, ``model.layers.{i}.self_attn`` / ``.mlp`` / ``.input_layernorm`` /
``.post_attention_layernorm``, ``model.norm``, ``lm_head``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from radixlm.config import ModelConfig
from radixlm.core import ForwardBatch
from radixlm.distributed import DPAttention, TPGroup
from radixlm.distributed.dp_attention import dp_gather, dp_gather_padded, dp_scatter, dp_scatter_padded
from radixlm.layers.embedding import ParallelLMHead, VocabParallelEmbedding, apply_embed_overrides
from radixlm.layers.layernorm import RMSNorm
from radixlm.layers.logits_processor import LogitsOutput, LogitsProcessor
from radixlm.mem import KVCacheSpec
from radixlm.models.kv_scales import KVScales
from radixlm.models.weights import load_named_weights

_LAYER_INDEX = re.compile(r"model\.layers\.(\d+)\.")


class PreNormDecoderLayer(nn.Module):
    """``x + attn(norm(x))``, then ``+ mlp(norm(.))``, with the residual carried into the fused add-norms.
    ``self_attn(positions, hidden, fb)`` and ``mlp(hidden)`` are the model's own; with LoRA adapters in the batch
    (``fb.lora``) the MLP is called ``mlp(hidden, fb.lora)``.

    A module whose first linear is FP8 says how that linear quantizes its input (``input_quant``, an
    ``ActivationQuant``; a module without the attribute, or None, takes tensors): the norm before it is asked to
    quantize its output (on CUDA it does, in the norm kernel, and the module gets an ``FP8Activation``).

    With data-parallel attention (``dp`` enabled) the attention and the residual stream hold this DP rank's tokens
    and ``mlp`` is sharded over the whole TP group: it runs on every DP rank's tokens (``dp_gather`` before it,
    ``dp_scatter`` after, sized by ``fb.dp_token_counts``; in a CUDA graph every rank's rows padded to
    ``fb.dp_padded_len``)."""

    def __init__(self, config: ModelConfig, self_attn: nn.Module, mlp: nn.Module, dp: DPAttention | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.dtype)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.dtype)
        self.mlp = mlp
        self.dp = dp if dp is not None and dp.enabled else None
        self.attn_input_quant = getattr(self_attn, "input_quant", None)
        # The MLP's input is gathered over the DP ranks first: it stays a tensor.
        self.mlp_input_quant = getattr(mlp, "input_quant", None) if self.dp is None else None

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None, fb: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden, quant=self.attn_input_quant)
        else:
            hidden, residual = self.input_layernorm(hidden, residual, self.attn_input_quant)
        hidden = self.self_attn(positions, hidden, fb)
        hidden, residual = self.post_attention_layernorm(hidden, residual, self.mlp_input_quant)
        if self.dp is None:
            # Only models whose MLP takes the adapters build a LoRA pool (``lora_projections``), so only theirs
            # see ``fb.lora`` set.
            return (self.mlp(hidden) if fb.lora is None else self.mlp(hidden, fb.lora)), residual
        if fb.dp_padded_len is not None:
            return dp_scatter_padded(self.mlp(dp_gather_padded(hidden, self.dp)), self.dp), residual
        counts = fb.dp_token_counts
        if counts is None:
            raise ValueError("a data-parallel attention step needs ForwardBatch.dp_token_counts")
        return dp_scatter(self.mlp(dp_gather(hidden, counts, self.dp)), counts, self.dp), residual


class DecoderModel(nn.Module):
    """Token embedding (prompt positions given as embeddings replace theirs), ``make_layer(i)`` for every layer,
    final norm: ``[num_tokens]`` ids -> ``[num_tokens, hidden]`` final hidden states.  ``vocab_tp``: the group
    the embedding (and the LM head over it) is split over; default the TP group."""

    def __init__(self, config: ModelConfig, make_layer: Callable[[int], nn.Module], vocab_tp: TPGroup | None = None):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, config.dtype, vocab_tp)
        self.layers = nn.ModuleList(make_layer(i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        hidden = apply_embed_overrides(self.embed_tokens(input_ids), fb.embed_overrides)  # [num_tokens, hidden]
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, fb)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class CausalLM(nn.Module):
    """A ``DecoderModel`` under a vocab-parallel LM head, split over the embedding's group (tied to the embedding
    when the config says so).

    Subclasses set ``stacked_params_mapping`` ((our parameter, checkpoint name, shard id): checkpoint tensors
    stacked into one parameter; see ``load_named_weights``) and implement ``kv_cache_spec``.  ``kv_scales`` holds
    the checkpoint's FP8 KV-cache scales after ``load_weights`` (empty when it has none), for the KV pool's creator.
    """

    stacked_params_mapping: list[tuple[str, str, object]] = []
    checkpoint_renames: list[tuple[str, str]] = []  # (checkpoint name part, ours), e.g. Mixtral's block_sparse_moe

    def __init__(self, config: ModelConfig, model: DecoderModel):
        super().__init__()
        self.config = config
        self.model = model
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, config.dtype, model.embed_tokens.tp,
                                      quantize=config.quantize_lm_head)
        if config.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor()
        self.kv_scales = KVScales()

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, fb: ForwardBatch) -> LogitsOutput:
        return self.logits_processor(self.model(input_ids, positions, fb), self.lm_head, fb)

    def kv_cache_spec(self, dtype: torch.dtype) -> KVCacheSpec:
        raise NotImplementedError

    def lora_projections(self) -> list[dict[str, nn.Module]]:
        """Per decoder layer, group name -> the linear layer LoRA adapters modify there (``radixlm.lora.pool``);
        ValueError for a model that does not take adapters (this default)."""
        raise ValueError(f"LoRA is not supported for {type(self).__name__} (--enable-lora serves Llama, Mistral, "
                         f"Qwen2 and dense Qwen3 models)")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        skip = ("rotary_emb.inv_freq",) + (("lm_head.weight",) if self.config.tie_word_embeddings else ())
        self.kv_scales = KVScales()
        load_named_weights(self, self.kv_scales.take(self._our_layers(weights)), self.stacked_params_mapping, skip)

    def _our_layers(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint minus the layers this model does not build: DeepSeek-V3's multi-token-prediction layer
        (stored as layer ``num_hidden_layers``), or the tail of a model cut short by
        ``--json-model-override-args '{"num_hidden_layers": N}'``; ``checkpoint_renames`` applied."""
        for name, tensor in weights:
            layer = _LAYER_INDEX.match(name)
            if layer is not None and int(layer.group(1)) >= self.config.num_hidden_layers:
                continue
            for theirs, ours in self.checkpoint_renames:
                name = name.replace(theirs, ours)
            yield name, tensor
