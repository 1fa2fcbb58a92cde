"""Rotary position embedding (RoPE) in its variants, and ``get_rope``, which builds the right one from a model's
parsed rope config (``ModelConfig.rope_theta`` and ``ModelConfig.rope_scaling``).

Every variant is one mechanism: a float32 table of each position's cos‖sin (``[max_position, rotary_dim]``, with
the frequency scaling and YaRN's attention factor already in it) and a rotation of pairs of dims of every q and k
head by the token's angles.  The variants differ along three independent axes:

- frequencies (``rope_scaling["rope_type"]``): ``default``, ``linear``, ``llama3``, ``yarn``, computed as
  transformers' ``ROPE_INIT_FUNCTIONS`` compute them;
- layout (``is_neox_style``): NeoX pairs dim i with dim i + rotary_dim / 2 (Llama, Qwen), GPT-J ("interleaved")
  pairs dims 2i and 2i + 1 (DeepSeek-V2/V3);
- positions: one per token, or M-RoPE's three (temporal, height, width; Qwen2-VL, Qwen2.5-VL), where each band of
  frequencies (``rope_scaling["mrope_section"]``) takes its angle from one of the three.

Dynamic NTK is deliberately absent: its frequencies depend on the current sequence length, which differs between
requests of one batch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from radixlm.kernels import fused_ops_for

if TYPE_CHECKING:
    from radixlm.kernels.kv_store import KVStore

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def get_rope(
    head_dim: int,
    max_position: int,
    base: float,
    rope_scaling: dict[str, Any] | None,
    rotary_dim: int | None = None,
    is_neox_style: bool = True,
) -> "RotaryEmbedding":
    """The rotary layer for a model: ``MRotaryEmbedding`` where ``rope_scaling`` has an ``mrope_section``, else
    ``RotaryEmbedding``; either one with the frequencies of ``rope_scaling["rope_type"]`` in ``is_neox_style``'s
    layout.

    ``rope_scaling`` is as ``radixlm.config.model_config._rope`` parses it (None for plain RoPE).  The first
    ``rotary_dim`` (default ``head_dim``) dims of each head are rotated, the rest pass through; angles exist for
    positions below ``max_position``.
    """
    rope_class = MRotaryEmbedding if rope_scaling and "mrope_section" in rope_scaling else RotaryEmbedding
    return rope_class(head_dim, max_position, base, rope_scaling, rotary_dim, is_neox_style)


def rope_frequencies(rotary_dim: int, base: float, scaling: dict[str, Any] | None) -> tuple[torch.Tensor, float]:
    """``(inv_freq, attention_factor)``: the angle per unit of position of each rotated pair (``[rotary_dim / 2]``
    float32) and the factor cos and sin are multiplied by (1.0 except for YaRN).

    The same values, bit for bit, as transformers' ``ROPE_INIT_FUNCTIONS[rope_type]`` for a config whose rotated
    dims (``head_dim * partial_rotary_factor``) are ``rotary_dim``.
    """
    # [rotary_dim / 2]
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / scaling["factor"], 1.0
    if rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if rope_type == "yarn":
        return _yarn_frequencies(rotary_dim, base, scaling)
    raise ValueError(f"unsupported rope scaling {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction for a context extended ``factor`` times: ``0.1 * mscale * ln(factor) + 1``."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_frequencies(rotary_dim: int, base: float, scaling: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """YaRN (transformers' ``_compute_yarn_parameters``, same operations in the same order): high frequencies
    (many turns within the original context) are kept, low ones divided by ``factor``, and a linear ramp over the
    dims between ``beta_fast`` and ``beta_slow`` turns blends the two."""
    factor = scaling["factor"]
    old_len = scaling["original_max_position_embeddings"]
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            # DeepSeek's pair.  Equal values (V2-Lite, V3) make this 1: their whole correction is then the
            # softmax-scale one of ``yarn_softmax_scale_factor``, which the attention layer applies.
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def dim_of_turns(turns: float) -> float:
        """The (fractional) dim whose wavelength fits ``turns`` times into the original context."""
        return (rotary_dim * math.log(old_len / (turns * 2 * math.pi))) / (2 * math.log(base))

    low, high = dim_of_turns(beta_fast), dim_of_turns(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # a step rather than a division by zero
    ramp = torch.clamp((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim)
    extrapolation = 1 - ramp  # [rotary_dim / 2]: 1 where a frequency is kept, 0 where it is interpolated
    inv_freq = 1.0 / (factor * pos_freqs) * (1 - extrapolation) + 1.0 / pos_freqs * extrapolation
    return inv_freq, float(attention_factor)


def yarn_softmax_scale_factor(rope_scaling: dict[str, Any] | None) -> float:
    """What DeepSeek-V2/V3 attention multiplies its softmax scale (``qk_head_dim ** -0.5``) by:
    ``yarn_mscale(factor, mscale_all_dim) ** 2`` for a scaled rope with ``mscale_all_dim``, else 1.0
    (transformers' ``yarn_apply_mscale``).

    YaRN's two corrections live in different places.  ``attention_factor`` (from ``mscale / mscale_all_dim``) is
    in the rotary layer's cos/sin table, so it scales the rotated dims of q and k only.  This one scales the whole
    logit q·k, the dims without position too, so it belongs to the attention layer and never to the table.
    """
    if not rope_scaling or rope_scaling["rope_type"] == "default" or not rope_scaling.get("mscale_all_dim"):
        return 1.0
    mscale = yarn_mscale(rope_scaling["factor"], rope_scaling["mscale_all_dim"])
    return mscale * mscale


class RotaryEmbedding(nn.Module):
    """RoPE at one position per token, in NeoX or GPT-J (interleaved) layout; build it with ``get_rope``."""

    def __init__(
        self,
        head_dim: int,
        max_position: int,
        base: float,
        rope_scaling: dict[str, Any] | None = None,
        rotary_dim: int | None = None,
        is_neox_style: bool = True,
    ):
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim or head_dim
        self.is_neox_style = is_neox_style
        inv_freq, attention_factor = rope_frequencies(self.rotary_dim, base, rope_scaling)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)  # [max_position, rotary_dim / 2]
        # [max_position, rotary_dim]: cos of every frequency, then sin, float32 whatever the model dtype; the
        # attention factor multiplies both in float32, before the cast to q's dtype, as in transformers
        cos_sin = torch.cat([freqs.cos() * attention_factor, freqs.sin() * attention_factor], dim=-1)
        self.register_buffer("cos_sin_cache", cos_sin, persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None,
        kv_out: "KVStore | None" = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rotate ``q`` [num_tokens, num_heads, head_dim] and ``k`` [num_tokens, num_kv_heads, head_dim] at
        ``positions`` [num_tokens].

        In NeoX layout, CUDA tensors take one Triton kernel for both, CPU tensors one C kernel (both bit-identical
        to ``forward_native``, the torch code).  The kernels know only the NeoX pairs, so the GPT-J layout takes
        the torch code on every device; a fused GPT-J kernel would be chosen here.

        ``kv_out`` (a KV pool's ``store_target``, with ``v``): the rotated K and ``v`` are stored in the cache
        instead of K being returned (None in its place); the Triton kernel does it in its own launch.
        """
        fused_ops = fused_ops_for(q) if self.is_neox_style else None
        if fused_ops is None:
            q, k = self.forward_native(positions, q, k)
        else:
            table, rows = self._angle_rows(positions)
            if kv_out is not None and q.is_cuda:  # the Triton kernel stores K/V itself
                return fused_ops.apply_rotary(q, k, rows, table, self.rotary_dim, v, kv_out)
            q, k = fused_ops.apply_rotary(q, k, rows, table, self.rotary_dim)
        if kv_out is None:
            return q, k
        kv_out.store(k, v)
        return q, None

    def forward_native(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The torch implementation of ``forward``, on any device."""
        table, rows = self._angle_rows(positions)
        cos, sin = table[rows].unsqueeze(1).chunk(2, dim=-1)  # [num_tokens, 1, rotary_dim / 2] each
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _angle_rows(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(table, rows)``: token t's cos‖sin is ``table[rows[t]]``, ``table`` [*, rotary_dim] float32 and
        contiguous, ``rows`` [num_tokens] (the form the fused kernels take, in this layer and beyond it)."""
        return self.cos_sin_cache, positions

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, passthrough = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        x1, x2 = rot.chunk(2, dim=-1) if self.is_neox_style else (rot[..., 0::2], rot[..., 1::2])
        # The angles are rounded to x's dtype and so is each product and sum, as in transformers (and the kernels)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        out1, out2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        out = torch.cat([out1, out2], dim=-1) if self.is_neox_style else torch.stack([out1, out2], dim=-1).flatten(-2)
        return torch.cat([out, passthrough], dim=-1) if passthrough.numel() else out


class MRotaryEmbedding(RotaryEmbedding):
    """M-RoPE (Qwen2-VL, Qwen2.5-VL): ``positions`` [3, num_tokens] hold each token's temporal, height and width
    position, and band j of ``rope_scaling["mrope_section"]`` (consecutive frequencies, e.g. [16, 24, 24] summing
    to rotary_dim / 2) takes its angles from row j.  Positions [num_tokens] (text-only batches) are plain RoPE;
    so are three equal rows, bit for bit.  Build it with ``get_rope``.
    """

    def __init__(
        self,
        head_dim: int,
        max_position: int,
        base: float,
        rope_scaling: dict[str, Any],
        rotary_dim: int | None = None,
        is_neox_style: bool = True,
    ):
        super().__init__(head_dim, max_position, base, rope_scaling, rotary_dim, is_neox_style)
        section = list(rope_scaling["mrope_section"])
        if rope_scaling.get("mrope_interleaved"):
            raise ValueError("interleaved M-RoPE (Qwen3-VL's mrope_interleaved) is not supported")
        if len(section) != 3 or sum(section) != self.rotary_dim // 2:
            raise ValueError(f"mrope_section {section} must be 3 bands summing to rotary_dim / 2 "
                             f"= {self.rotary_dim // 2}")
        row_of_freq = torch.repeat_interleave(torch.arange(3), torch.tensor(section))  # [rotary_dim / 2]
        # [rotary_dim]: the position row each column of cos_sin_cache takes its angle from (a frequency's cos and
        # sin share it)
        self.register_buffer("row_of_column", torch.cat([row_of_freq, row_of_freq]), persistent=False)

    def _angle_rows(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() == 1:
            return self.cos_sin_cache, positions
        # One table row per token, each column from its own row of positions, so that the fused kernels (which
        # read one table row per token) rotate M-RoPE too
        column_positions = positions.T[:, self.row_of_column].long()  # [num_tokens, rotary_dim]
        table = torch.gather(self.cos_sin_cache, 0, column_positions)  # [num_tokens, rotary_dim], contiguous
        return table, torch.arange(positions.shape[1], device=positions.device)
