"""Attention through the engine's own Triton kernels (``radixlm.kernels``): the GPU backend.

Decode uses flash-decoding over a fixed number of KV splits whose fp32 scratch is allocated once, for the
largest batch, at construction: a decode step then allocates only its output and reads no device value on the
host, so it can be captured in a CUDA graph at any batch size up to ``max_batch_size`` and replayed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from radixlm.attention.base import AttentionBackend
from radixlm.kernels.decode_attention import decode_attention_fwd
from radixlm.kernels.extend_attention import extend_attention_fwd

if TYPE_CHECKING:
    from radixlm.core import ForwardBatch
    from radixlm.layers.attention import RadixAttention


class TritonAttnBackend(AttentionBackend):
    """``num_heads`` and ``num_kv_heads`` are per tensor-parallel rank; ``num_kv_splits`` is how many key ranges
    of every request stage 1 of decode attends to in parallel."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, max_batch_size: int,
                 device: torch.device | str, num_kv_splits: int = 8) -> None:
        self.num_kv_splits = num_kv_splits
        # [max_batch_size, num_heads, num_kv_splits, head_dim] normalised output of every split
        self.mid_o = torch.empty((max_batch_size, num_heads, num_kv_splits, head_dim), dtype=torch.float32,
                                 device=device)
        # [max_batch_size, num_heads, num_kv_splits] log-sum-exp of every split
        self.mid_lse = torch.empty((max_batch_size, num_heads, num_kv_splits), dtype=torch.float32, device=device)
        self.max_extend_len = 0

    def init_forward_metadata(self, fb: "ForwardBatch") -> None:
        # Decode needs nothing beyond the batch's own tensors; extend sizes its grid from the host lengths.
        if not fb.is_decode:
            self.max_extend_len = max(fb.extend_seq_lens_cpu)

    def forward_extend(self, q: torch.Tensor, layer: "RadixAttention", fb: "ForwardBatch") -> torch.Tensor:
        k_buf, v_buf = fb.token_to_kv_pool.get_kv_buffer(layer.layer_id)
        o = torch.empty_like(q)
        extend_attention_fwd(
            q, k_buf, v_buf, o, fb.req_to_token_pool.req_to_token, fb.req_pool_indices, fb.extend_prefix_lens,
            fb.extend_seq_lens, fb.extend_start_loc, self.max_extend_len, layer.scaling, layer.sliding_window,
        )
        return o

    def forward_decode(self, q: torch.Tensor, layer: "RadixAttention", fb: "ForwardBatch") -> torch.Tensor:
        k_buf, v_buf = fb.token_to_kv_pool.get_kv_buffer(layer.layer_id)
        bs = q.shape[0]
        o = torch.empty_like(q)
        decode_attention_fwd(
            q, k_buf, v_buf, o, fb.req_to_token_pool.req_to_token, fb.req_pool_indices, fb.seq_lens,
            self.mid_o[:bs], self.mid_lse[:bs], layer.scaling, layer.sliding_window,
        )
        return o
