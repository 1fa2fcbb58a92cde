"""How a model's linear weights are stored: ``QuantConfig`` from the checkpoint's ``quantization_config`` or from
``--quantization``.

Two FP8 (E4M3) forms:

- **block-wise, from the checkpoint** (DeepSeek-V3's format): ``quant_method: "fp8"``, ``weight_block_size:
  [128, 128]``, ``activation_scheme: "dynamic"``; each quantized linear stores ``weight`` in float8_e4m3fn and
  ``weight_scale_inv`` [ceil(out / 128), ceil(in / 128)] float32 (multiply to dequantize); activations are
  quantized per token per group of 128 channels at run time.
- **online** (``--quantization fp8`` on a bf16/fp16 checkpoint): weights quantized at load with one scale per
  output channel, activations per token at run time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

QUANTIZATION_METHODS = ("fp8",)


@dataclass(frozen=True)
class QuantConfig:
    method: str  # "fp8"
    weight_block: tuple[int, int] | None  # (rows, columns) of a scale block; None: one scale per output channel
    from_checkpoint: bool  # the checkpoint holds the quantized weights (else they are quantized at load)

    @classmethod
    def resolve(cls, hf_config: dict[str, Any], quantization: str | None) -> "QuantConfig | None":
        """The checkpoint's ``quantization_config`` if it has one (``--quantization`` may name the same method),
        else ``--quantization`` as online quantization, else None."""
        qc = hf_config.get("quantization_config")
        if qc:
            method = qc.get("quant_method")
            if method != "fp8":
                raise NotImplementedError(f"checkpoint quantization {method!r} is not supported (only fp8)")
            if quantization not in (None, method):
                raise ValueError(f"--quantization {quantization} conflicts with the checkpoint's {method!r}")
            if qc.get("fmt", "e4m3") != "e4m3":
                raise NotImplementedError(f"FP8 checkpoints in {qc['fmt']!r} are not supported (only e4m3)")
            if qc.get("activation_scheme", "dynamic") != "dynamic":
                raise NotImplementedError("FP8 checkpoints with static activation scales are not supported "
                                          "(only activation_scheme 'dynamic')")
            block = qc.get("weight_block_size")
            if not block or len(block) != 2:
                raise NotImplementedError("FP8 checkpoints without weight_block_size (per-tensor scales) are not "
                                          "supported; block-wise ones (e.g. [128, 128]) are")
            if qc.get("modules_to_not_convert") or qc.get("ignored_layers"):
                raise NotImplementedError("FP8 checkpoints that leave some linear layers unquantized "
                                          "(modules_to_not_convert) are not supported yet")
            return cls("fp8", (int(block[0]), int(block[1])), True)
        if quantization is None:
            return None
        if quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"--quantization must be one of {', '.join(QUANTIZATION_METHODS)}; got {quantization!r}")
        return cls(quantization, None, False)
