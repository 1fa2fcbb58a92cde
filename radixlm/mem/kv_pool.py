"""KV pools: per-layer buffers indexed by KV slot, in the layout of a ``KVCacheSpec``.

The interface is what the attention backends use: ``set_kv`` stores a step's new K/V at its slots and
``get_kv_buffer`` returns the K and V views of one layer.  Every buffer has ``size + page_size`` rows; the first
page is the padding target (padded tokens write their KV there; the allocator never hands it out).  Buffers are
zero-initialised: padded slots are read under a mask, and a NaN there would survive ``0 * x``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from radixlm.mem.kv_spec import KVCacheSpec


class KVPool(ABC):
    def __init__(self, spec: KVCacheSpec, size: int, page_size: int, device: torch.device | str) -> None:
        self.spec = spec
        self.size = size
        self.page_size = page_size
        self.dtype = spec.dtype
        self.device = torch.device(device)

    @abstractmethod
    def set_kv(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None) -> None:
        """Store the new tokens' ``k`` [num_tokens, num_kv_heads, head_dim] and ``v`` [.., v_head_dim] (None
        where the layout derives V from K) at slots ``loc`` [num_tokens] of layer ``layer_id``."""

    @abstractmethod
    def get_kv_buffer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k [slots, num_kv_heads, head_dim], v [slots, num_kv_heads, v_head_dim])`` of one layer; V may be a
        strided view into K's storage (MLA)."""

    @abstractmethod
    def buffers(self) -> list[torch.Tensor]:
        """Every tensor the pool owns (for its byte count)."""

    def bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _new_buffer(self, width: int, heads: int) -> torch.Tensor:
        return torch.zeros((self.size + self.page_size, heads, width), dtype=self.dtype, device=self.device)


class MHAKVPool(KVPool):
    """Separate K and V buffers per layer: ``[size + page_size, num_kv_heads, head_dim | v_head_dim]``."""

    def __init__(self, spec: KVCacheSpec, size: int, page_size: int, device: torch.device | str) -> None:
        super().__init__(spec, size, page_size, device)
        self.k_buffers = [self._new_buffer(spec.head_dim, spec.num_kv_heads) for _ in range(spec.num_layers)]
        self.v_buffers = [self._new_buffer(spec.v_head_dim, spec.num_kv_heads) for _ in range(spec.num_layers)]

    def set_kv(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None) -> None:
        assert v is not None, "an MHA cache stores V separately"
        self.k_buffers[layer_id][loc] = k.to(self.dtype)
        self.v_buffers[layer_id][loc] = v.to(self.dtype)

    def get_kv_buffer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k_buffers[layer_id], self.v_buffers[layer_id]

    def buffers(self) -> list[torch.Tensor]:
        return self.k_buffers + self.v_buffers


class MLAKVPool(KVPool):
    """One latent buffer per layer, ``[size + page_size, 1, kv_lora_rank + qk_rope_head_dim]``; V is the latent
    part of each row, ``buffer[..., :kv_lora_rank]``, so a token costs one vector instead of per-head K and V."""

    def __init__(self, spec: KVCacheSpec, size: int, page_size: int, device: torch.device | str) -> None:
        super().__init__(spec, size, page_size, device)
        self.kv_buffers = [self._new_buffer(spec.head_dim, 1) for _ in range(spec.num_layers)]

    def set_kv(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None) -> None:
        self.kv_buffers[layer_id][loc] = k.to(self.dtype)  # v is k's latent part: nothing more to store

    def get_kv_buffer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        buf = self.kv_buffers[layer_id]
        return buf, buf[..., : self.spec.v_head_dim]

    def buffers(self) -> list[torch.Tensor]:
        return self.kv_buffers


POOLS: dict[str, type[KVPool]] = {"mha": MHAKVPool, "mla": MLAKVPool}


def create_kv_pool(spec: KVCacheSpec, size: int, page_size: int, device: torch.device | str) -> KVPool:
    """The pool of ``spec.layout`` with ``size`` slots (a multiple of ``page_size``)."""
    return POOLS[spec.layout](spec, size, page_size, device)
