"""Rotary position embedding (NeoX layout: the two rotated halves are the first and second half of the head).

Supported scalings: none, ``linear`` (positions divided by a factor) and ``llama3`` (frequency-dependent
scaling of Llama 3.1+).  Dynamic NTK is deliberately absent: its frequencies depend on the current sequence
length, which differs between requests of one batch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from radixlm.kernels import fused_ops_for

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def _inv_freq(rotary_dim: int, base: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope scaling {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


class RotaryEmbedding(nn.Module):
    def __init__(
        self,
        head_dim: int,
        max_position: int,
        base: float,
        rope_scaling: dict[str, Any] | None = None,
        rotary_dim: int | None = None,
    ):
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim or head_dim
        inv_freq = _inv_freq(self.rotary_dim, base, rope_scaling)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        # [max_position, rotary_dim]: cos of every frequency, then sin; float32 whatever the model dtype
        self.register_buffer("cos_sin_cache", torch.cat([freqs.cos(), freqs.sin()], dim=-1), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q`` [num_tokens, num_heads, head_dim] and ``k`` [num_tokens, num_kv_heads, head_dim].

        CUDA tensors take one Triton kernel for both, CPU tensors one C kernel (both bit-identical to
        ``forward_native``, the torch code).
        """
        fused_ops = fused_ops_for(q)
        if fused_ops is None:
            return self.forward_native(positions, q, k)
        return fused_ops.apply_rotary(q, k, positions, self.cos_sin_cache, self.rotary_dim)

    def forward_native(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The torch implementation of ``forward``, on any device."""
        cos, sin = self.cos_sin_cache[positions].chunk(2, dim=-1)  # [num_tokens, rotary_dim / 2] each
        cos = torch.cat([cos, cos], dim=-1).unsqueeze(1)
        sin = torch.cat([sin, sin], dim=-1).unsqueeze(1)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, passthrough = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        half = self.rotary_dim // 2
        rotated_half = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
        out = rot * cos.to(x.dtype) + rotated_half * sin.to(x.dtype)
        return torch.cat([out, passthrough], dim=-1) if passthrough.numel() else out
