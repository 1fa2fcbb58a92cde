"""Attention backends: one interface, several implementations (``--attention-backend``)."""

from __future__ import annotations

import torch

from radixlm.attention.base import AttentionBackend
from radixlm.attention.torch_native import TorchNativeAttnBackend

BACKENDS = ("torch_native", "triton", "cpu")


def create_attention_backend(name: str, *, num_heads: int, num_kv_heads: int, head_dim: int, max_batch_size: int,
                             device: torch.device) -> AttentionBackend:
    """Build backend ``name``; the shapes (per tensor-parallel rank) size the Triton backend's decode scratch."""
    if name == "torch_native":
        return TorchNativeAttnBackend()
    if name == "cpu":
        from radixlm.attention.cpu_backend import CpuAttnBackend

        return CpuAttnBackend(head_dim)
    if name == "triton":
        # Imported here so that CPU-only use never imports triton (and the kernels are decorated only after a
        # test has chosen the Triton interpreter).
        from radixlm.attention.triton_backend import TritonAttnBackend

        return TritonAttnBackend(num_heads, num_kv_heads, head_dim, max_batch_size, device)
    raise ValueError(f"unknown attention backend {name!r}; available: {', '.join(BACKENDS)}")


__all__ = ["AttentionBackend", "TorchNativeAttnBackend", "create_attention_backend"]
