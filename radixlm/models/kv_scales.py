"""FP8 KV-cache scales carried by a checkpoint: which tensors they are, and the per-layer mapping they become.

A checkpoint calibrated for an FP8 KV cache stores, per decoder layer, the dequantization multiplier of the cached
K and of the cached V (``x = stored * scale``, so the cache stores ``x / scale``).  The names in use:

    model.layers.{i}.self_attn.k_scale / .v_scale                compressed-tensors (llm-compressor), vLLM-style
    model.layers.{i}.self_attn.kv_scale                          older AutoFP8 exports: one scale for K and V
    model.layers.{i}.self_attn.k_proj.k_scale / v_proj.v_scale   NVIDIA ModelOpt
    model.layers.{i}.self_attn.k_proj.output_scale / v_proj...   older compressed-tensors (k_proj's output is K)
    model.layers.{i}.self_attn.kv_a_proj_with_mqa.k_scale        ModelOpt-style exports of DeepSeek (MLA)

Each is a scalar or a 1-element tensor; a per-head scale ([num_kv_heads]) is reduced to its largest element,
with which no head's values leave the FP8 range (heads with smaller scales lose some precision).  The cache keeps
per-layer scales only.  An MLA cache holds one latent per token: its scale is the layer's K scale (``kv_scale``
too); a V scale there is not used.  ``q_scale`` / ``prob_scale`` (for attention computed in FP8, which radixlm does
not do) are recognised and dropped, so that no attention-quantization scale breaks loading.

``KVScales.take`` lifts these tensors out of the checkpoint stream before the rest is routed to parameters (a
``k_proj.k_scale`` would otherwise be sent to the stacked qkv_proj and refused); the model keeps the result and
whoever creates the KV pool applies it (``KVScales.apply``) when the cache is FP8, and ignores it otherwise.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from radixlm.mem import KVPool

_SCALE_NAME = re.compile(
    r"model\.layers\.(\d+)\.self_attn\."
    r"(?:(?:(?:k_proj|v_proj|kv_a_proj_with_mqa)\.)?(?P<kind>k|v|kv|q|prob)_scale"
    r"|(?P<proj>k|v|q)_proj\.output_scale)"
)


def kv_scale_name(name: str) -> tuple[int, str] | None:
    """``(layer, "k" | "v" | "kv")`` for a KV-cache scale tensor's checkpoint name, ``(layer, "")`` for an
    attention-quantization scale radixlm drops (q, prob), None for any other tensor."""
    m = _SCALE_NAME.fullmatch(name)
    if m is None:
        return None
    kind = m.group("kind") or m.group("proj")
    return int(m.group(1)), kind if kind in ("k", "v", "kv") else ""


@dataclass
class KVScales:
    """A checkpoint's KV-cache scales: layer id -> ``{"k": scale, "v": scale}`` (either may be absent)."""

    by_layer: dict[int, dict[str, float]] = field(default_factory=dict)

    def take(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint stream without its attention scales; the KV ones are recorded here as the stream is
        consumed (a ``kv_scale`` as both K and V)."""
        for name, tensor in weights:
            found = kv_scale_name(name)
            if found is None:
                yield name, tensor
                continue
            layer, kind = found
            if kind:
                value = tensor.float().max().item()
                for which in ("k", "v") if kind == "kv" else (kind,):
                    self.by_layer.setdefault(layer, {})[which] = value

    def __bool__(self) -> bool:
        return bool(self.by_layer)

    def layer(self, layer_id: int) -> tuple[float, float]:
        """``(k_scale, v_scale)`` of one layer; 1.0 (uncalibrated) for what the checkpoint does not give."""
        found = self.by_layer.get(layer_id, {})
        return found.get("k", 1.0), found.get("v", 1.0)

    def apply(self, pool: KVPool) -> None:
        """Set the scales of every layer the checkpoint gives them for in ``pool``, an FP8 pool created for this
        model and not yet written to."""
        for layer_id in sorted(self.by_layer):
            k_scale, v_scale = self.layer(layer_id)
            used = (("k_scale", k_scale), ("v_scale", v_scale))[: pool.spec.num_scales]
            for what, value in used:
                if not (math.isfinite(value) and value > 0.0):
                    raise ValueError(f"checkpoint KV-cache {what} of layer {layer_id} is {value}; a scale must "
                                     "be a positive finite number")
            pool.set_kv_scales(layer_id, k_scale, v_scale)
