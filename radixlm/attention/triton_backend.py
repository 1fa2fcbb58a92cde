"""Attention through the engine's own Triton kernels (``radixlm.kernels``): the GPU backend.

Decode uses flash-decoding over a fixed number of KV splits whose fp32 scratch is allocated once, for the
largest batch, at construction: a decode step then allocates only its output and reads no device value on the
host, so it can be captured in a CUDA graph at any batch size up to ``max_batch_size`` and replayed.  EXTEND,
MIXED (its decode rows are one-token extends) and TARGET_VERIFY (the batch's custom mask over the draft tokens)
run the extend kernel.  Keys may be wider than values, and V a view of K's rows (an MLA latent cache).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from radixlm.attention.base import AttentionBackend
from radixlm.kernels.decode_attention import decode_attention_fwd
from radixlm.kernels.extend_attention import extend_attention_fwd
from radixlm.mem import KVCacheSpec

if TYPE_CHECKING:
    from radixlm.core import ForwardBatch
    from radixlm.layers.attention import RadixAttention


class TritonAttnBackend(AttentionBackend):
    """``num_heads`` is per tensor-parallel rank; ``num_kv_splits`` is how many key ranges of every request stage
    1 of decode attends to in parallel."""

    name = "triton"

    def __init__(self, num_heads: int, kv_spec: KVCacheSpec, max_batch_size: int, device: torch.device | str,
                 num_kv_splits: int = 8) -> None:
        self.num_kv_splits = num_kv_splits
        # [max_batch_size, num_heads, num_kv_splits, v_head_dim] normalised output of every split
        self.mid_o = torch.empty((max_batch_size, num_heads, num_kv_splits, kv_spec.v_head_dim),
                                 dtype=torch.float32, device=device)
        # [max_batch_size, num_heads, num_kv_splits] log-sum-exp of every split
        self.mid_lse = torch.empty((max_batch_size, num_heads, num_kv_splits), dtype=torch.float32, device=device)
        self.max_extend_len = 0

    def prepare(self, fb: "ForwardBatch") -> None:
        # Decode needs nothing beyond the batch's own tensors; extend sizes its grid from the host lengths.
        if not fb.is_decode:
            self.max_extend_len = max(fb.extend_seq_lens_cpu)

    def forward_extend(self, q: torch.Tensor, layer: "RadixAttention", fb: "ForwardBatch") -> torch.Tensor:
        k_buf, v_buf = fb.kv_pool.get_kv_buffer(layer.layer_id)
        o = q.new_empty((q.shape[0], q.shape[1], v_buf.shape[-1]))
        extend_attention_fwd(
            q, k_buf, v_buf, o, fb.req_to_token_pool.req_to_token, fb.req_pool_indices, fb.extend_prefix_lens,
            fb.extend_seq_lens, fb.extend_start_loc, self.max_extend_len, layer.scaling, layer.sliding_window,
            custom_mask=fb.custom_mask, mask_indptr=fb.mask_indptr,
        )
        return o

    def forward_decode(self, q: torch.Tensor, layer: "RadixAttention", fb: "ForwardBatch") -> torch.Tensor:
        k_buf, v_buf = fb.kv_pool.get_kv_buffer(layer.layer_id)
        bs = q.shape[0]
        o = q.new_empty((bs, q.shape[1], v_buf.shape[-1]))
        decode_attention_fwd(
            q, k_buf, v_buf, o, fb.req_to_token_pool.req_to_token, fb.req_pool_indices, fb.seq_lens,
            self.mid_o[:bs], self.mid_lse[:bs], layer.scaling, layer.sliding_window,
        )
        return o
