"""Vocabulary-parallel token embedding and LM head: rank r holds rows ``[r * V/tp, (r+1) * V/tp)`` of the
(padded) vocabulary, over the TP group or the group given (data-parallel attention: the attention group, whose
ranks hold the same tokens)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from radixlm.config.quant_config import QuantConfig
from radixlm.distributed import TPGroup, get_tp_group
from radixlm.layers import fp8_linear
from radixlm.layers.linear import linear

VOCAB_PAD = 64  # each rank's shard is a multiple of this, for aligned matmuls


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype = torch.float32,
                 tp: TPGroup | None = None):
        super().__init__()
        self.tp = tp if tp is not None else get_tp_group()
        self.vocab_size = vocab_size
        multiple = VOCAB_PAD * self.tp.size
        self.padded_vocab_size = -(-vocab_size // multiple) * multiple
        self.shard_size = self.padded_vocab_size // self.tp.size
        self.shard_start = self.tp.rank * self.shard_size
        self.weight = nn.Parameter(torch.zeros(self.shard_size, hidden_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.weight.checkpoint_shapes = {None: (vocab_size, hidden_size)}

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        rows = max(0, min(self.shard_size, self.vocab_size - self.shard_start))
        param.data.zero_()  # padding rows stay zero
        param.data[:rows].copy_(loaded[self.shard_start : self.shard_start + rows])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [num_tokens] -> [num_tokens, hidden]
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.shard_start
        outside = (local < 0) | (local >= self.shard_size)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states to vocabulary logits; ``compute_logits`` gathers the shards and drops padding.

    ``quantize`` (``--quantize-lm-head``): after loading, the head holds its own FP8 copy of its weight, one scale
    per output channel (online FP8's form, whatever the checkpoint's linears are; a head tied to the embedding is
    untied, the embedding keeps its weight), and computes the logits as an online-FP8 linear does
    (``fp8_linear.fp8_forward``: the decode GEMV at decode-sized batches, activations per 128-channel group)."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype = torch.float32,
                 tp: TPGroup | None = None, quantize: bool = False):
        super().__init__(vocab_size, hidden_size, dtype, tp)
        self.quant = QuantConfig("fp8", None, False) if quantize else None
        self.input_quant = fp8_linear.input_quant(self.quant, hidden_size)

    def finish_loading(self) -> None:
        if self.quant is not None:
            fp8_linear.finish_loading(self, self.quant)  # a new parameter: a tied embedding keeps the old one

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The FP8 head's weight in ``dtype``, made once (the CPU path of ``fp8_forward``)."""
        return fp8_linear.cached_dequantized(self, dtype)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [n, hidden] -> [n, vocab] float32
        if self.quant is not None:
            logits = fp8_linear.fp8_forward(self, hidden)
        else:
            logits = linear(hidden, self.weight)
        logits = self.tp.all_gather(logits, dim=-1)
        return logits[:, : self.vocab_size].float()

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        """Share the embedding's weight (tied word embeddings): the checkpoint has no separate lm_head."""
        self.weight = embedding.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("ParallelLMHead is not an embedding lookup; use compute_logits")


def apply_embed_overrides(hidden: torch.Tensor,
                          overrides: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """``hidden`` [num_tokens, hidden] with the rows at ``overrides[0]`` ([n] int64) replaced by ``overrides[1]``
    ([n, hidden]): prompt positions given as embeddings (image features) instead of token ids."""
    if overrides is None:
        return hidden
    index, values = overrides
    return hidden.index_copy(0, index, values.to(hidden.dtype))
