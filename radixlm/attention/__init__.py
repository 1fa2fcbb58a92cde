"""Attention backends: one interface, several implementations (``--attention-backend``)."""

from radixlm.attention.base import AttentionBackend
from radixlm.attention.torch_native import TorchNativeAttnBackend

BACKENDS = {"torch_native": TorchNativeAttnBackend}


def create_attention_backend(name: str) -> AttentionBackend:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {', '.join(BACKENDS)}")
    return BACKENDS[name]()


__all__ = ["AttentionBackend", "TorchNativeAttnBackend", "create_attention_backend"]
