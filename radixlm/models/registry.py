"""Model classes by the HF ``architectures`` name."""

from __future__ import annotations

import importlib

from torch import nn

_MODELS = {
    "DeepseekV2ForCausalLM": "radixlm.models.deepseek_v2",
    "DeepseekV3ForCausalLM": "radixlm.models.deepseek_v2",
    "LlamaForCausalLM": "radixlm.models.llama",
    "MistralForCausalLM": "radixlm.models.llama",
    "MixtralForCausalLM": "radixlm.models.mixtral",
    "Qwen2ForCausalLM": "radixlm.models.qwen2",
    "Qwen3ForCausalLM": "radixlm.models.qwen3",
    "Qwen3MoeForCausalLM": "radixlm.models.qwen3_moe",
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def get_model_class(architecture: str) -> type[nn.Module]:
    if architecture not in _MODELS:
        raise ValueError(f"unsupported model architecture {architecture!r}; "
                         f"radixlm supports: {', '.join(supported_architectures())}")
    return getattr(importlib.import_module(_MODELS[architecture]), architecture)
