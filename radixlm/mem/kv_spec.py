"""What one token's KV cache looks like, described as data (vLLM's ``KVCacheSpec``).

A model declares its spec (``model.kv_cache_spec(dtype)``); the KV pool allocates from it, the memory sizing
divides the budget by ``bytes_per_token()``, and the attention backends size their scratch from it.  A new
layout is a new ``layout`` value plus a pool class, not a branch in every reader.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LAYOUTS = ("mha", "mla")
# --kv-cache-dtype names of the quantized caches
FP8_KV_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


@dataclass(frozen=True)
class KVCacheSpec:
    """The KV cache of one model on one tensor-parallel rank.

    ``mha``: per layer a K buffer ``[slots, num_kv_heads, head_dim]`` and a V buffer
    ``[slots, num_kv_heads, v_head_dim]``.
    ``mla``: per layer one latent buffer ``[slots, 1, head_dim]`` (DeepSeek: ``kv_lora_rank + qk_rope_head_dim``
    per token, no heads, the same on every TP rank); V is its first ``v_head_dim`` (``kv_lora_rank``) columns,
    read in place, so attention over it is MQA with one KV head.

    ``dtype`` is what the buffers store.  An FP8 dtype (``torch.float8_e4m3fn`` or ``torch.float8_e5m2``,
    ``--kv-cache-dtype fp8_e4m3 | fp8_e5m2``) makes the cache quantized: the pool stores ``fp8(x / scale)``,
    saturated to the format's finite range, with one float32 scale per layer for K and one for V (MLA: one for
    the latent, ``num_scales``).  The scales live in the pool, ``KVPool.scales [num_layers, num_scales]`` on the
    cache's device, and readers get a layer's through ``KVPool.get_kv_scales`` and dequantize ``x = stored *
    scale`` as they load (the Triton kernels fold the K scale into the softmax scale and the V scale into the
    output).  ``bytes_per_token`` counts one byte per FP8 element; the per-layer scales are not per token and
    are left out of it.
    """

    layout: str
    num_layers: int
    num_kv_heads: int
    head_dim: int  # K width per head (MLA: the whole latent + rope vector)
    v_head_dim: int  # V width per head (MLA: the latent part of the same vector)
    dtype: torch.dtype

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown KV layout {self.layout!r}; known: {', '.join(LAYOUTS)}")
        if self.layout == "mla" and (self.num_kv_heads != 1 or self.v_head_dim > self.head_dim):
            raise ValueError("an MLA cache has one latent 'head' whose value part is a prefix of its key")

    @classmethod
    def mha(cls, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
            v_head_dim: int | None = None) -> "KVCacheSpec":
        return cls("mha", num_layers, num_kv_heads, head_dim, v_head_dim or head_dim, dtype)

    @classmethod
    def mla(cls, num_layers: int, kv_lora_rank: int, qk_rope_head_dim: int, dtype: torch.dtype) -> "KVCacheSpec":
        return cls("mla", num_layers, 1, kv_lora_rank + qk_rope_head_dim, kv_lora_rank, dtype)

    @property
    def quantized(self) -> bool:
        """The buffers hold FP8 values to be multiplied by the layer's scales."""
        return self.dtype in FP8_KV_DTYPES.values()

    @property
    def num_scales(self) -> int:
        """Scales per layer of a quantized cache: K and V (MHA), the latent alone (MLA)."""
        return 1 if self.layout == "mla" else 2

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def bytes_per_token(self) -> int:
        """Bytes one token's KV takes over all layers (the unit of the memory sizing)."""
        if self.layout == "mla":
            return self.num_layers * self.head_dim * self.element_size
        return self.num_layers * self.num_kv_heads * (self.head_dim + self.v_head_dim) * self.element_size
