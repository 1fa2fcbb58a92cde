"""Attention backends: one interface, several implementations (``--attention-backend``)."""

from __future__ import annotations

import torch

from radixlm.attention.base import AttentionBackend, UnsupportedForwardMode
from radixlm.attention.torch_native import TorchNativeAttnBackend
from radixlm.mem import KVCacheSpec

BACKENDS = ("torch_native", "triton", "cpu")


def create_attention_backend(name: str, *, num_heads: int, kv_spec: KVCacheSpec, max_batch_size: int,
                             device: torch.device, max_context_len: int | None = None) -> AttentionBackend:
    """Build backend ``name`` for a model with ``num_heads`` query heads per rank and a KV cache like
    ``kv_spec``; the shapes size the Triton backend's decode scratch, ``max_context_len`` (a request's longest
    sequence) bounds its MLA split count."""
    if name == "torch_native":
        return TorchNativeAttnBackend()
    if name == "cpu":
        from radixlm.attention.cpu_backend import CpuAttnBackend

        return CpuAttnBackend(kv_spec.head_dim, kv_spec.v_head_dim, kv_spec.quantized)
    if name == "triton":
        # Imported here so that CPU-only use never imports triton (and the kernels are decorated only after a
        # test has chosen the Triton interpreter).
        from radixlm.attention.triton_backend import TritonAttnBackend

        return TritonAttnBackend(num_heads, kv_spec, max_batch_size, device, max_context_len=max_context_len)
    raise ValueError(f"unknown attention backend {name!r}; available: {', '.join(BACKENDS)}")


__all__ = ["AttentionBackend", "TorchNativeAttnBackend", "UnsupportedForwardMode", "create_attention_backend"]
