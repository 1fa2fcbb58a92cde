"""Attention through the engine's own Triton kernels (``radixlm.kernels``): the GPU backend.

Decode uses flash-decoding over KV splits whose fp32 scratch is allocated once, for the largest batch, at
construction: a decode step then allocates only its output and reads no device value on the host, so it can be
captured in a CUDA graph at any batch size up to ``max_batch_size`` and replayed.  GQA caches always run
``num_kv_splits`` splits.  An MLA cache (one latent KV head, so a small batch has few programs) takes the split
count of ``plan_decode_splits`` for each batch size, a function of the batch size, head count, longest context
and SM count only; the scratch is one flat buffer viewed as ``[bs, heads, splits, v_head_dim]``, so small
batches get more splits in the bytes that ``num_kv_splits`` splits of the largest batch take.  EXTEND,
MIXED (its decode rows are one-token extends) and TARGET_VERIFY (the batch's custom mask over the draft tokens)
run the extend kernel.  Keys may be wider than values, and V a view of K's rows (an MLA latent cache).  An FP8
cache passes the layer's scales (device tensors of the pool) to both kernels, which dequantize as they load.
Where the layer's output feeds an FP8 linear that takes group-quantized input (``RadixAttention.out_quant``) and
quantization is fused (``fused_quant_for``: CUDA), decode returns that input (an ``FP8Activation``) made by the
merge kernel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from radixlm.attention.base import AttentionBackend
from radixlm.kernels import fused_quant_for
from radixlm.kernels.decode_attention import (
    DEFAULT_KV_SPLITS, MAX_KV_SPLITS, decode_attention_fwd, plan_decode_splits, quant_group_fits,
)
from radixlm.kernels.fp8 import FP8_DTYPE
from radixlm.kernels.fp8_activation import FP8Activation
from radixlm.kernels.extend_attention import extend_attention_fwd
from radixlm.mem import KVCacheSpec

if TYPE_CHECKING:
    from radixlm.core import ForwardBatch
    from radixlm.layers.attention import RadixAttention


class TritonAttnBackend(AttentionBackend):
    """``num_heads`` is per tensor-parallel rank; ``num_kv_splits`` is how many key ranges of every request stage
    1 of decode attends to in parallel (GQA; the MLA plan never goes below DEFAULT_KV_SPLITS).  ``max_context_len`` bounds the
    MLA split count, ``num_sms`` (default: the device's, 1 on CPU) sets its target."""

    name = "triton"

    def __init__(self, num_heads: int, kv_spec: KVCacheSpec, max_batch_size: int, device: torch.device | str,
                 num_kv_splits: int = DEFAULT_KV_SPLITS, max_context_len: int | None = None,
                 num_sms: int | None = None) -> None:
        self.num_heads, self.kv_spec = num_heads, kv_spec
        self.num_kv_splits = num_kv_splits
        self.adaptive_splits = kv_spec.layout == "mla"
        device = torch.device(device)
        if num_sms is None:
            num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        self.num_sms = num_sms
        self.max_context_len = max_context_len or 1
        # Enough for num_kv_splits splits of the largest batch and, for MLA, MAX_KV_SPLITS of a batch of one.
        rows = max_batch_size * num_kv_splits
        if self.adaptive_splits:
            rows = max(rows, MAX_KV_SPLITS)
        # flat [rows * num_heads * v_head_dim] normalised output of every split, viewed per batch size
        self.mid_o = torch.empty(rows * num_heads * kv_spec.v_head_dim, dtype=torch.float32, device=device)
        # flat [rows * num_heads] log-sum-exp of every split
        self.mid_lse = torch.empty(rows * num_heads, dtype=torch.float32, device=device)
        self.max_batch_size = max_batch_size
        self._splits: dict[int, int] = {}  # batch size -> planned splits (every layer of every step asks)
        self.max_extend_len = 0
        self.decode_tail = 0  # trailing one-token rows of an extend batch, run by the decode kernel

    def decode_splits(self, batch_size: int) -> int:
        """KV splits of a decode launch of ``batch_size`` rows (fixed per batch size: CUDA graphs replay it)."""
        if not self.adaptive_splits:
            return self.num_kv_splits
        if batch_size not in self._splits:
            spec = self.kv_spec
            capacity = self.mid_lse.numel() // (batch_size * self.num_heads)
            self._splits[batch_size] = plan_decode_splits(
                batch_size, spec.num_kv_heads, self.num_heads // spec.num_kv_heads, spec.head_dim, spec.v_head_dim,
                spec.element_size, self.max_context_len, self.num_sms, capacity)
        return self._splits[batch_size]

    def decode_scratch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views ``(mid_o [bs, heads, splits, v_head_dim], mid_lse [bs, heads, splits])`` of the flat scratch."""
        splits = self.decode_splits(batch_size)
        n = batch_size * self.num_heads * splits
        return (self.mid_o[: n * self.kv_spec.v_head_dim].view(batch_size, self.num_heads, splits, -1),
                self.mid_lse[:n].view(batch_size, self.num_heads, splits))

    def prepare(self, fb: "ForwardBatch") -> None:
        # Decode needs nothing beyond the batch's own tensors; extend sizes its grid from the host lengths.
        if fb.is_decode:
            return
        lens = fb.extend_seq_lens_cpu
        # One new token after a prefix is a decode: a MIXED step's decode rows (at its end) take the decode kernel,
        # which reads each KV head once for its whole query group instead of once per query head, in a 64-row
        # query block.  (A verification mask covers every row, so TARGET_VERIFY keeps them all in extend.)
        tail = 0
        if fb.custom_mask is None:
            while tail < len(lens) and lens[len(lens) - 1 - tail] == 1:
                tail += 1
        self.decode_tail = min(tail, self.max_batch_size)
        self.max_extend_len = max(lens[: len(lens) - self.decode_tail], default=0)

    def forward_extend(self, q: torch.Tensor, layer: "RadixAttention", fb: "ForwardBatch") -> torch.Tensor:
        k_buf, v_buf = fb.kv_pool.get_kv_buffer(layer.layer_id)
        k_scale, v_scale = fb.kv_pool.get_kv_scales(layer.layer_id) or (None, None)
        o = q.new_empty((q.shape[0], q.shape[1], v_buf.shape[-1]))
        rows, tail = fb.batch_size - self.decode_tail, self.decode_tail
        if rows:
            extend_attention_fwd(
                q, k_buf, v_buf, o, fb.req_to_token_pool.req_to_token, fb.req_pool_indices[:rows],
                fb.extend_prefix_lens[:rows], fb.extend_seq_lens[:rows], fb.extend_start_loc[:rows],
                self.max_extend_len, layer.scaling, layer.sliding_window, custom_mask=fb.custom_mask,
                mask_indptr=fb.mask_indptr, k_scale=k_scale, v_scale=v_scale,
            )
        if tail:
            self._decode(q[-tail:], o[-tail:], k_buf, v_buf, layer, fb, fb.req_pool_indices[rows:], fb.seq_lens[rows:])
        return o

    def forward_decode(self, q: torch.Tensor, layer: "RadixAttention", fb: "ForwardBatch"
                       ) -> torch.Tensor | FP8Activation:
        k_buf, v_buf = fb.kv_pool.get_kv_buffer(layer.layer_id)
        bs, heads, dv = q.shape[0], q.shape[1], v_buf.shape[-1]
        group = None
        if layer.out_quant is not None and fused_quant_for(q) is not None:
            group = layer.out_quant.at(bs).group_size
        if not quant_group_fits(dv, group):
            o = q.new_empty((bs, heads, dv))
            self._decode(q, o, k_buf, v_buf, layer, fb, fb.req_pool_indices, fb.seq_lens)
            return o
        o = torch.empty((bs, heads, dv), dtype=FP8_DTYPE, device=q.device)
        o_scale = torch.empty((bs, heads * dv // group), dtype=torch.float32, device=q.device)
        self._decode(q, o, k_buf, v_buf, layer, fb, fb.req_pool_indices, fb.seq_lens, o_scale)
        return FP8Activation(o.view(bs, heads * dv), o_scale, q.dtype, torch.Size((bs, heads * dv)))

    def _decode(self, q: torch.Tensor, o: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
                layer: "RadixAttention", fb: "ForwardBatch", rows: torch.Tensor, seq_lens: torch.Tensor,
                o_scale: torch.Tensor | None = None) -> None:
        mid_o, mid_lse = self.decode_scratch(q.shape[0])
        k_scale, v_scale = fb.kv_pool.get_kv_scales(layer.layer_id) or (None, None)
        decode_attention_fwd(
            q, k_buf, v_buf, o, fb.req_to_token_pool.req_to_token, rows, seq_lens, mid_o, mid_lse, layer.scaling,
            layer.sliding_window, k_scale=k_scale, v_scale=v_scale, o_scale=o_scale,
        )
