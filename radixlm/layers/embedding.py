"""Vocabulary-parallel token embedding and LM head: rank r holds rows ``[r * V/tp, (r+1) * V/tp)`` of the
(padded) vocabulary, over the TP group or the group given (data-parallel attention: the attention group, whose
ranks hold the same tokens)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from radixlm.distributed import TPGroup, get_tp_group
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
    """Projects hidden states to vocabulary logits; ``compute_logits`` gathers the shards and drops padding."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [n, hidden] -> [n, vocab] float32
        logits = self._fp8_logits(hidden)
        if logits is None:
            logits = linear(hidden, self.weight)
        logits = self.tp.all_gather(logits, dim=-1)
        return logits[:, : self.vocab_size].float()

    def _fp8_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """EXPERIMENT (GPU run P2, ``RADIXLM_FP8_LM_HEAD=1``): decode-sized batches through an online-FP8 copy."""
        import os

        if os.environ.get("RADIXLM_FP8_LM_HEAD") != "1" or hidden.device.type != "cuda" or hidden.shape[0] > 16:
            return None
        from radixlm.kernels.fp8_gemm import per_token_group_quant_fp8_triton
        from radixlm.kernels.fp8_gemv import fp8_gemv
        from radixlm.layers.fp8_linear import quantize_online

        fp8 = getattr(self, "_fp8_copy", None)
        if fp8 is None:
            if torch.cuda.is_current_stream_capturing():
                return None
            fp8 = self._fp8_copy = quantize_online(self.weight.data)
        x_q, x_s = per_token_group_quant_fp8_triton(hidden, 128)
        return fp8_gemv(x_q, x_s, *fp8, None, hidden.dtype)

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
