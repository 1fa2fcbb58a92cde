"""LoRA adapters for tests, built with peft in setup (seconds on CPU for the tiny and the embedded model)."""

from __future__ import annotations

import copy

import peft
import torch


def build_peft_adapter(hf: torch.nn.Module, directory: str, r: int, alpha: float, rslora: bool, targets,
                       layers, seed: int = 0, std: float = 0.2):
    """A peft LoRA model over a copy of ``hf`` with random A and B (peft starts B at zero, which would make every
    check trivial; ``std``: their spread), saved to ``directory``; returns the peft model."""
    config = peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=targets,
                             layers_to_transform=layers, lora_dropout=0.0)
    model = peft.get_peft_model(copy.deepcopy(hf), config).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, std)
    model.save_pretrained(directory)
    return model
