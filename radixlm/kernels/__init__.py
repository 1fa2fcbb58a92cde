"""Triton kernels of the engine: paged decode and extend attention over the KV pool."""

from radixlm.kernels.decode_attention import decode_attention_fwd
from radixlm.kernels.extend_attention import extend_attention_fwd

__all__ = ["decode_attention_fwd", "extend_attention_fwd"]
