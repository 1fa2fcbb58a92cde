"""The attention layer of a transformer block; the math lives in the batch's attention backend."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from radixlm.kernels.fp8_activation import ActivationQuant, FP8Activation

if TYPE_CHECKING:
    from radixlm.core import ForwardBatch
    from radixlm.kernels.kv_store import KVStore


class RadixAttention(nn.Module):
    """Paged attention over the radix/KV cache for one layer (its KV buffers are ``layer_id``'s).

    ``head_dim`` is the width of queries and keys, ``v_head_dim`` (default ``head_dim``) that of values and of
    the output.  An MLA layer (absorbed DeepSeek attention) has one KV "head" whose value is a prefix of its key
    and passes ``v=None``: the pool stores the key vector once.

    ``out_quant``: the input quantization of the FP8 linear the output feeds (the o projection's
    ``input_quant``); a backend may then return the output so quantized, as an ``FP8Activation``.
    """

    def __init__(self, num_heads: int, head_dim: int, scaling: float, num_kv_heads: int, layer_id: int,
                 sliding_window: int | None = None, v_head_dim: int | None = None,
                 out_quant: ActivationQuant | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.v_head_dim = v_head_dim or head_dim
        self.scaling = scaling
        self.num_kv_heads = num_kv_heads
        self.layer_id = layer_id
        self.sliding_window = sliding_window
        self.out_quant = out_quant

    def kv_store_target(self, forward_batch: "ForwardBatch") -> "KVStore | None":
        """Where this layer's new K/V rows go, for a kernel before ``forward`` that stores them itself (the
        rotary kernel), which then passes ``k=None``; None where the pool stores them in ``forward``."""
        return forward_batch.kv_pool.store_target(self.layer_id, forward_batch.out_cache_loc)

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads * head_dim]
        k: torch.Tensor | None,  # [num_tokens, num_kv_heads * head_dim]; None: stored already (``kv_store_target``)
        v: torch.Tensor | None,  # [num_tokens, num_kv_heads * v_head_dim], None for an MLA layer
        forward_batch: "ForwardBatch",
    ) -> torch.Tensor | FP8Activation:  # [num_tokens, num_heads * v_head_dim]
        out = forward_batch.attn_backend.forward(
            q.view(-1, self.num_heads, self.head_dim),
            None if k is None else k.view(-1, self.num_kv_heads, self.head_dim),
            None if v is None else v.view(-1, self.num_kv_heads, self.v_head_dim),
            self,
            forward_batch,
        )
        return out if isinstance(out, FP8Activation) else out.reshape(-1, self.num_heads * self.v_head_dim)
