"""LoRA adapters (issue #22): PEFT-format loading and validation (``adapter``), their layout in the engine's
merged, tensor-parallel layers (``layout``), the adapter memory pool (``pool``) and ``LoRAManager`` (``manager``:
load, unload, residency, a batch's segments; imported from there, as it needs the executor's vocabulary)."""

from radixlm.lora.adapter import LoRAAdapter, LoRAAdapterError, LoRAConfig, load_lora_adapter
from radixlm.lora.layout import MergedLoRA, merged_lora, shard_merged_lora, shard_row_lora

__all__ = ["LoRAAdapter", "LoRAAdapterError", "LoRAConfig", "MergedLoRA", "load_lora_adapter", "merged_lora",
           "shard_merged_lora", "shard_row_lora"]
