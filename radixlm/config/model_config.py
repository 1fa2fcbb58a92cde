"""What the engine needs to know about a model, read from its HF ``config.json`` (no transformers import).

Both config dialects are understood: transformers 4 (``rope_theta`` + ``rope_scaling``) and transformers 5
(``rope_parameters``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from radixlm.config.quant_config import QuantConfig

from radixlm.utils import cpu_features

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters plus the resolved serving dtype and context length."""

    model_path: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    context_length: int
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    tie_word_embeddings: bool
    attention_bias: bool
    sliding_window: int | None
    hidden_act: str
    dtype: torch.dtype
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    hf_config: dict[str, Any] = field(repr=False, compare=False)
    quant: QuantConfig | None = None  # FP8 weights: from the checkpoint, or --quantization
    enable_fp8_mla_bmm: bool = False  # MLA's absorbed W_UK / W_UV products in FP8 (--enable-fp8-mla-bmm)
    quantize_lm_head: bool = False  # the LM head in FP8 too, per output channel (--quantize-lm-head)

    @classmethod
    def from_hf(
        cls,
        model_path: str,
        dtype: str = "auto",
        device: str = "cpu",
        context_length: int | None = None,
        hf_config: dict[str, Any] | None = None,
        quantization: str | None = None,
        enable_fp8_mla_bmm: bool = False,
        quantize_lm_head: bool = False,
    ) -> "ModelConfig":
        """Read ``model_path/config.json`` (or use ``hf_config``) and resolve dtype (``resolve_dtype``) and
        context length.  ``enable_fp8_mla_bmm`` needs an MLA model (a ``kv_lora_rank``; ValueError),
        ``quantize_lm_head`` FP8 weights (``--quantization fp8`` or an FP8 checkpoint; ValueError)."""
        if hf_config is None:
            hf_config = read_hf_config(model_path)
        archs = hf_config.get("architectures") or []
        if not archs:
            raise ValueError(f"{model_path}: config.json has no 'architectures' field")
        from radixlm.models.registry import supported_architectures

        if archs[0] not in supported_architectures():
            raise ValueError(f"unsupported model architecture {archs[0]!r}; "
                             f"radixlm supports: {', '.join(supported_architectures())}")
        num_heads = hf_config["num_attention_heads"]
        hidden = hf_config["hidden_size"]
        max_pos = hf_config.get("max_position_embeddings", 2048)
        if context_length is not None and context_length > max_pos:
            raise ValueError(
                f"--context-length {context_length} exceeds the model's max_position_embeddings {max_pos}"
            )
        if enable_fp8_mla_bmm and not hf_config.get("kv_lora_rank"):
            raise ValueError(f"--enable-fp8-mla-bmm applies to MLA models (DeepSeek-V2/V3); {archs[0]} has no "
                             "latent attention")
        quant = QuantConfig.resolve(hf_config, quantization)
        if quantize_lm_head and quant is None:
            raise ValueError("--quantize-lm-head needs FP8 weights: --quantization fp8, or an FP8 checkpoint")
        rope_theta, rope_scaling = _rope(hf_config)
        sliding = hf_config.get("sliding_window")
        if hf_config.get("use_sliding_window") is False:
            sliding = None
        return cls(
            model_path=model_path,
            architecture=archs[0],
            vocab_size=hf_config["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf_config["intermediate_size"],
            num_hidden_layers=hf_config["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=hf_config.get("num_key_value_heads") or num_heads,
            head_dim=hf_config.get("head_dim") or hidden // num_heads,
            rms_norm_eps=hf_config.get("rms_norm_eps", 1e-6),
            max_position_embeddings=max_pos,
            context_length=context_length or max_pos,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
            attention_bias=bool(hf_config.get("attention_bias", False)),
            sliding_window=sliding,
            hidden_act=hf_config.get("hidden_act", "silu"),
            dtype=resolve_dtype(dtype, hf_config, device),
            bos_token_id=hf_config.get("bos_token_id"),
            eos_token_ids=_eos_ids(model_path, hf_config),
            hf_config=hf_config,
            quant=quant,
            enable_fp8_mla_bmm=enable_fp8_mla_bmm,
            quantize_lm_head=quantize_lm_head,
        )


def read_hf_config(model_path: str) -> dict[str, Any]:
    """``model_path/config.json`` as a dict."""
    config_file = os.path.join(model_path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"no config.json in model path {model_path!r}")
    with open(config_file) as f:
        return json.load(f)


def resolve_dtype(dtype: str, hf_config: dict[str, Any], device: str) -> torch.dtype:
    """``--dtype`` as a torch dtype.  ``auto`` starts from the checkpoint's dtype (config.json's ``torch_dtype``,
    or transformers 5's ``dtype``).  On GPU: that dtype, a float32 checkpoint (or none declared) in bfloat16.  On
    CPU: a bfloat16 or float16 checkpoint keeps its dtype only where the CPU has that arithmetic natively (else
    torch emulates it, slower than float32), everything else is float32."""
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(f"--dtype must be one of auto, {', '.join(sorted(set(_DTYPES)))}; got {dtype!r}")
        return _DTYPES[dtype]
    declared = str(hf_config.get("torch_dtype") or hf_config.get("dtype"))
    if device == "cpu":
        ckpt = _DTYPES.get(declared, torch.float32)
        return ckpt if ckpt in cpu_features.native_half_dtypes() else torch.float32
    ckpt = _DTYPES.get(declared, torch.bfloat16)
    return torch.bfloat16 if ckpt == torch.float32 else ckpt


def _rope(hf_config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Return (rope_theta, rope_scaling) from either config dialect, as ``radixlm.layers.rotary.get_rope`` takes
    them: rope_scaling is None for plain RoPE, else the config's parameters with the frequency scaling under
    "rope_type" (the legacy "type" key folded into it) and, for M-RoPE, the bands under "mrope_section".
    """
    params = hf_config.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta = float(params["rope_theta"])
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(hf_config.get("rope_theta", 10000.0))
        scaling = dict(hf_config.get("rope_scaling") or {})
    legacy_type = scaling.pop("type", "default")
    rope_type = scaling.get("rope_type", legacy_type)
    if rope_type == "mrope":
        # Qwen2-VL's name for M-RoPE with unscaled frequencies (transformers rewrites it to "default"): what makes
        # it M-RoPE is mrope_section, kept below
        rope_type = "default"
    if rope_type == "default" and "mrope_section" not in scaling:
        return theta, None
    scaling["rope_type"] = rope_type
    return theta, scaling


def _eos_ids(model_path: str, hf_config: dict[str, Any]) -> tuple[int, ...]:
    """All end-of-sequence ids: generation_config.json's eos_token_id (int or list) plus config.json's."""
    ids: list[int] = []
    for source in (_read_json(os.path.join(model_path, "generation_config.json")), hf_config):
        eos = source.get("eos_token_id")
        for i in eos if isinstance(eos, list) else [eos]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return tuple(ids)


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)
