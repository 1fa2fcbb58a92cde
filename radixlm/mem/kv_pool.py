"""KV pools: per-layer buffers indexed by KV slot, in the layout of a ``KVCacheSpec``.

The interface is what the attention backends use: ``set_kv`` stores a step's new K/V at its slots and
``get_kv_buffer`` returns the K and V views of one layer.  Every buffer has ``size + page_size`` rows; the first
page is the padding target (padded tokens write their KV there; the allocator never hands it out).  Buffers are
zero-initialised: padded slots are read under a mask, and a NaN there would survive ``0 * x``.

A quantized pool (``spec.quantized``: FP8 storage) keeps one float32 scale per layer for K and one for V (MLA: one
for the latent) in ``scales``, all 1.0 unless ``set_kv_scales`` is given a checkpoint's.  ``set_kv`` stores
``fp8(x / scale)`` clamped to the format's largest finite value first, so an out-of-range value saturates
instead of turning into inf (E5M2) or NaN (E4M3 has no inf) whatever the device's cast does.  Scale 1.0 suits
normal models: E4M3 spans +-448 with 3 mantissa bits, E5M2 +-57344 with 2, and post-RoPE K and V stay well
inside +-448.  Readers take the layer's scales from ``get_kv_scales`` and dequantize ``x = stored * scale``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

from radixlm.mem.kv_spec import KVCacheSpec

if TYPE_CHECKING:
    from radixlm.kernels.kv_store import KVStore


class KVPool(ABC):
    def __init__(self, spec: KVCacheSpec, size: int, page_size: int, device: torch.device | str) -> None:
        self.spec = spec
        self.size = size
        self.page_size = page_size
        self.dtype = spec.dtype
        self.device = torch.device(device)
        # [num_layers, num_scales] float32 (K, V | latent) of a quantized cache; per-layer views built once, as the
        # backends ask for them in every layer of every step
        self.scales: torch.Tensor | None = None
        self._layer_scales: list[tuple[torch.Tensor, torch.Tensor]] = []
        if spec.quantized:
            self.scales = torch.ones((spec.num_layers, spec.num_scales), dtype=torch.float32, device=self.device)
            cols = (0, 1) if spec.num_scales == 2 else (0, 0)
            self._layer_scales = [(row[cols[0]: cols[0] + 1], row[cols[1]: cols[1] + 1]) for row in self.scales]

    @abstractmethod
    def set_kv(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None) -> None:
        """Store the new tokens' ``k`` [num_tokens, num_kv_heads, head_dim] and ``v`` [.., v_head_dim] (None
        where the layout derives V from K) at slots ``loc`` [num_tokens] of layer ``layer_id``."""

    @abstractmethod
    def get_kv_buffer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k [slots, num_kv_heads, head_dim], v [slots, num_kv_heads, v_head_dim])`` of one layer; V may be a
        strided view into K's storage (MLA)."""

    def store_target(self, layer_id: int, loc: torch.Tensor) -> "KVStore | None":
        """Where a kernel that produces the new tokens' K and V may store them itself (``kv_store.KVStore``:
        the layer's buffers, ``loc`` [num_tokens] and scales), instead of ``set_kv`` after it; None where this
        pool takes ``set_kv`` only (buffers off CUDA, layouts whose V derives from K)."""
        return None

    def get_kv_scales(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(k_scale [1], v_scale [1])`` float32 device views of a quantized cache's layer (MLA: the latent's
        scale twice, V being part of it); None for an unquantized cache."""
        return self._layer_scales[layer_id] if self.scales is not None else None

    def set_kv_scales(self, layer_id: int, k_scale: float, v_scale: float | None = None) -> None:
        """A layer's scales (a checkpoint's ``k_scale`` / ``v_scale``), set before anything is stored: stored
        values are ``x / scale``.  MLA takes ``k_scale`` for its latent."""
        assert self.scales is not None, "only a quantized (FP8) cache has scales"
        self.scales[layer_id, 0] = k_scale
        if self.spec.num_scales == 2:
            self.scales[layer_id, 1] = k_scale if v_scale is None else v_scale

    def _store(self, loc: torch.Tensor, k_buf: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor | None,
               v_buf: torch.Tensor | None = None, v: torch.Tensor | None = None,
               v_scale: torch.Tensor | None = None) -> None:
        """``k_buf[loc] = k`` (and ``v_buf[loc] = v``) in the buffers' dtype; quantized: ``fp8(x / scale)``,
        saturated.  On CUDA one Triton launch for both (``kernels.kv_store``; the same bytes)."""
        if k_buf.is_cuda:
            from radixlm.kernels.kv_store import store_kv

            store_kv(k_buf, loc, k, v_buf, v, k_scale, v_scale)
            return
        for buf, x, scale in ((k_buf, k, k_scale), (v_buf, v, v_scale)):
            if buf is None:
                continue
            if scale is None:
                buf[loc] = x.to(self.dtype)
                continue
            limit = torch.finfo(self.dtype).max
            quantized = (x.float() / scale).clamp_(-limit, limit).to(self.dtype)
            # Through a uint8 view: index_put on float8 tensors is not implemented on every device.
            buf.view(torch.uint8)[loc] = quantized.view(torch.uint8)

    def read_rows(self, buf: torch.Tensor, index: torch.Tensor, layer_id: int, which: int = 0,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``buf[index]`` (a buffer or view of this pool's layer ``layer_id``; ``which`` 0 for K, 1 for V) in
        ``dtype``, dequantized when the cache is quantized: the gather for code that reads rows in torch."""
        scales = self.get_kv_scales(layer_id)
        if scales is None:
            return buf[index].to(dtype)
        return (buf.view(torch.uint8)[index].view(self.dtype).float() * scales[which]).to(dtype)

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
        k_scale, v_scale = self.get_kv_scales(layer_id) or (None, None)
        self._store(loc, self.k_buffers[layer_id], k, k_scale, self.v_buffers[layer_id], v, v_scale)

    def get_kv_buffer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k_buffers[layer_id], self.v_buffers[layer_id]

    def store_target(self, layer_id: int, loc: torch.Tensor) -> "KVStore | None":
        if not self.device.type == "cuda":
            return None
        from radixlm.kernels.kv_store import KVStore  # CUDA only: CPU installs may lack triton

        k_scale, v_scale = self.get_kv_scales(layer_id) or (None, None)
        return KVStore(self.k_buffers[layer_id], self.v_buffers[layer_id], loc, k_scale, v_scale)

    def buffers(self) -> list[torch.Tensor]:
        return self.k_buffers + self.v_buffers


class MLAKVPool(KVPool):
    """One latent buffer per layer, ``[size + page_size, 1, kv_lora_rank + qk_rope_head_dim]``; V is the latent
    part of each row, ``buffer[..., :kv_lora_rank]``, so a token costs one vector instead of per-head K and V."""

    def __init__(self, spec: KVCacheSpec, size: int, page_size: int, device: torch.device | str) -> None:
        super().__init__(spec, size, page_size, device)
        self.kv_buffers = [self._new_buffer(spec.head_dim, 1) for _ in range(spec.num_layers)]

    def set_kv(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None) -> None:
        scales = self.get_kv_scales(layer_id)
        # v is k's latent part: nothing more to store
        self._store(loc, self.kv_buffers[layer_id], k, None if scales is None else scales[0])

    def get_kv_buffer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        buf = self.kv_buffers[layer_id]
        return buf, buf[..., : self.spec.v_head_dim]

    def buffers(self) -> list[torch.Tensor]:
        return self.kv_buffers


POOLS: dict[str, type[KVPool]] = {"mha": MHAKVPool, "mla": MLAKVPool}


def create_kv_pool(spec: KVCacheSpec, size: int, page_size: int, device: torch.device | str) -> KVPool:
    """The pool of ``spec.layout`` with ``size`` slots (a multiple of ``page_size``)."""
    return POOLS[spec.layout](spec, size, page_size, device)
