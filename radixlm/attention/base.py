"""The attention-backend interface.

A backend is built once per model runner.  For every batch the runner calls ``init_forward_metadata`` once
(index arrays, masks, split plans shared by all layers); then each attention layer calls ``forward``, which
stores the new tokens' K/V in the KV pool (unless the layer's rotary kernel stored them: ``k`` None) and attends
over each request's whole sequence.

Forward modes: DECODE runs ``forward_decode`` (one query per request); EXTEND, MIXED (decode rows are one-token
extends) and TARGET_VERIFY (the new tokens see each other through ``fb.custom_mask`` instead of causally) run
``forward_extend``; IDLE has no tokens and returns an empty output.  A backend lists what it runs in
``supported_modes`` and refuses the rest with a clear error, before any layer runs.

K and V may differ in width (``layer.head_dim`` vs ``layer.v_head_dim``), and V may be a view into K's
storage (an MLA latent cache); backends read both through ``kv_pool.get_kv_buffer``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

from radixlm.core import ForwardMode

if TYPE_CHECKING:
    from radixlm.core import ForwardBatch
    from radixlm.layers.attention import RadixAttention
    from radixlm.kernels.fp8_activation import FP8Activation


class UnsupportedForwardMode(NotImplementedError):
    """A batch asked a backend for a mode or KV layout it does not implement."""


class AttentionBackend(ABC):
    name = "base"
    supported_modes: frozenset[ForwardMode] = frozenset(ForwardMode)

    def init_forward_metadata(self, fb: "ForwardBatch") -> None:
        """Check that this backend runs the batch, then prepare what every layer of it shares."""
        if fb.forward_mode not in self.supported_modes:
            raise UnsupportedForwardMode(
                f"the {self.name} attention backend does not run {fb.forward_mode.name} batches; it runs "
                f"{', '.join(sorted(m.name for m in self.supported_modes))} (--attention-backend picks another)")
        if not fb.forward_mode.is_idle:
            self.prepare(fb)

    @abstractmethod
    def prepare(self, fb: "ForwardBatch") -> None:
        """Per-batch metadata shared by all layers (never called for IDLE)."""

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor | None,  # [num_tokens, num_kv_heads, head_dim]; None: K/V are already in the cache
        v: torch.Tensor | None,  # [num_tokens, num_kv_heads, v_head_dim]; None where V is read from K (MLA)
        layer: "RadixAttention",
        forward_batch: "ForwardBatch",
        save_kv_cache: bool = True,
    ) -> "torch.Tensor | FP8Activation":  # [num_tokens, num_heads, v_head_dim]
        if forward_batch.forward_mode.is_idle:
            return q.new_empty((0, layer.num_heads, layer.v_head_dim))
        if save_kv_cache and k is not None:
            forward_batch.kv_pool.set_kv(layer.layer_id, forward_batch.out_cache_loc, k, v)
        if forward_batch.is_decode:
            return self.forward_decode(q, layer, forward_batch)
        return self.forward_extend(q, layer, forward_batch)

    @abstractmethod
    def forward_extend(self, q: torch.Tensor, layer: "RadixAttention", forward_batch: "ForwardBatch") -> torch.Tensor:
        """New tokens attend to their request's cached prefix and to each other (causally, or through the
        batch's custom mask in TARGET_VERIFY)."""

    @abstractmethod
    def forward_decode(self, q: torch.Tensor, layer: "RadixAttention", forward_batch: "ForwardBatch"
                       ) -> "torch.Tensor | FP8Activation":
        """One new token per request attends to the request's whole sequence.  A backend may return the output
        quantized as ``layer.out_quant`` asks (an ``FP8Activation`` [num_tokens, num_heads * v_head_dim])."""
