"""Turn ``ServerArgs`` into a ``ModelConfig`` and a model with its weights on the target device."""

from __future__ import annotations

import os

import torch
from torch import nn

from radixlm.config import ModelConfig, ServerArgs
from radixlm.config.model_config import read_hf_config
from radixlm.models.embedded import embedded_model_path
from radixlm.models.presets import PRESETS
from radixlm.models.registry import get_model_class
from radixlm.models.weights import dummy_weights, iter_safetensors


def resolve_model_config(args: ServerArgs) -> ModelConfig:
    """Model path → config: no path means the embedded model; with ``--load-format dummy`` a preset name
    (``llama-3.1-8b``, ``deepseek-v3``, ...) stands for its config; ``--json-model-override-args`` is merged
    over it.  ``--enable-dp-attention`` needs an MLA model (ValueError)."""
    path = args.model_path
    if path is None:
        path = embedded_model_path()
    if args.load_format == "dummy" and path in PRESETS:
        hf_config = dict(PRESETS[path])
    elif not os.path.isdir(path):
        presets = f"; presets for --load-format dummy: {', '.join(PRESETS)}" if args.load_format == "dummy" else ""
        raise FileNotFoundError(f"model path {path!r} is not a directory{presets}")
    else:
        hf_config = read_hf_config(path)
    hf_config.update(args.model_overrides())
    if args.enable_dp_attention and not hf_config.get("kv_lora_rank"):
        arch = (hf_config.get("architectures") or ["the model"])[0]
        raise ValueError(f"--enable-dp-attention applies to MLA models (DeepSeek-V2/V3), whose one latent KV head "
                         f"cannot be split over ranks; {arch} has no latent attention")
    return ModelConfig.from_hf(path, args.dtype, args.device, args.context_length, hf_config=hf_config,
                               quantization=args.quantization, enable_fp8_mla_bmm=args.enable_fp8_mla_bmm,
                               quantize_lm_head=args.quantize_lm_head)


def load_model(config: ModelConfig, load_format: str, device: torch.device, seed: int) -> nn.Module:
    """Build the model for ``config.architecture`` on ``device`` and fill its weights.

    ``load_format``: ``auto``/``safetensors`` read the checkpoint; ``dummy`` generates seeded random weights.
    """
    model_cls = get_model_class(config.architecture)
    with torch.device(device):
        model = model_cls(config)
    if load_format == "dummy":
        weights = dummy_weights(model, seed, model.stacked_params_mapping)
    else:
        weights = iter_safetensors(config.model_path)
    model.load_weights(weights)
    # After the checkpoint is in: online FP8 quantizes what was loaded, MLA's FP8 products take W_UK / W_UV.  In
    # module order, so a layer runs before its sub-layers (the MLA attention reads kv_b_proj unquantized).
    for module in model.modules():
        if hasattr(module, "finish_loading"):
            module.finish_loading()
    return model.eval()
