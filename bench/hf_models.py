"""The peer model for benchmarks: an HF checkpoint directory, or a preset config (``radixlm.models.presets``)
instantiated by transformers with random weights on the device (same shapes and dtype as radixlm's
``--load-format dummy``; speed does not depend on the values when both sides ignore EOS)."""

from __future__ import annotations

import os

import torch
import transformers

from radixlm.models.presets import PRESETS


def load_hf_model(model_path: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    if not os.path.isdir(model_path) and model_path in PRESETS:
        spec = dict(PRESETS[model_path])
        arch = spec.pop("architectures")[0]
        config = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**spec, architectures=[arch])
        torch.manual_seed(0)
        with torch.device(device):
            return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    return transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, device_map=device).eval()
