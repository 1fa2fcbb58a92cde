"""An adapter's A/B tensors in the layout of the layers they modify: merged projections and tensor parallelism.

The engine computes q/k/v in one ``qkv_proj`` matmul and gate/up in one ``gate_up_proj``.  For such a merged
layer of S slices the adapter becomes one shrink and S expands::

    h = x @ A_stacked^T                        # [tokens, S * r]: slice s's A in rows s*r:(s+1)*r of A_stacked
    y[:, off_s:off_s + out_s] += scaling * h[:, s*r:(s+1)*r] @ B_s^T

A slice the adapter does not modify gets zero A rows and a zero B, so every adapter has the same layout.

Tensor parallelism follows the base layers (``radixlm.layers.linear``):
- column-parallel (qkv_proj, gate_up_proj): A replicated; each slice's B split along its outputs exactly where the
  base layer splits that slice (Q by heads, K/V by KV heads, a KV head replicated on ``tp / num_kv_heads`` ranks
  when there are fewer KV heads than ranks), so rank t's expand writes rank t's columns.
- row-parallel (o_proj, down_proj): A split along its inputs like the base weight, B replicated.  Each rank's
  ``scaling * (x_t @ A_t^T) @ B^T`` is a partial sum like its base partial product; added to it before the
  layer's all-reduce, the sum over ranks is the full ``scaling * (x @ A^T) @ B^T``: no extra communication.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from radixlm.config.model_config import ModelConfig
from radixlm.distributed import divide
from radixlm.lora.adapter import LoRAAdapter, projection_shape

# Merged layer -> the PEFT modules it stacks along its output, in the engine's order (LlamaForCausalLM's
# stacked_params_mapping).
MERGED_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
ROW_PARALLEL_PROJECTIONS = ("o_proj", "down_proj")


@dataclass(frozen=True)
class MergedLoRA:
    """One adapter's weights for one merged layer (full, or one TP rank's shard).

    ``a``: [num_slices * r, in] stacked A; ``bs``: per slice B [out_s, r] (this rank's rows of it when sharded);
    ``offsets``: each slice's first column in the layer's (local) output, ``offsets[s] + bs[s].shape[0]`` its
    end."""

    a: torch.Tensor
    bs: tuple[torch.Tensor, ...]
    offsets: tuple[int, ...]


def merged_lora(adapter: LoRAAdapter, layer: int, merged: str, model_config: ModelConfig) -> MergedLoRA | None:
    """The full (unsharded) stacked layout of ``adapter`` for ``merged`` (a key of ``MERGED_PROJECTIONS``) in
    decoder layer ``layer``; None when the adapter modifies none of its slices there."""
    modules = MERGED_PROJECTIONS[merged]
    if not any((layer, m) in adapter.weights for m in modules):
        return None
    r = adapter.rank
    a_parts: list[torch.Tensor] = []
    bs: list[torch.Tensor] = []
    offsets: list[int] = []
    offset = 0
    for module in modules:
        out_features, in_features = projection_shape(model_config, module)
        pair = adapter.weights.get((layer, module))
        if pair is None:
            dtype = next(iter(adapter.weights.values()))[0].dtype
            pair = (torch.zeros(r, in_features, dtype=dtype), torch.zeros(out_features, r, dtype=dtype))
        a_parts.append(pair[0])
        bs.append(pair[1])
        offsets.append(offset)
        offset += out_features
    return MergedLoRA(a=torch.cat(a_parts), bs=tuple(bs), offsets=tuple(offsets))


def column_shard_ranges(merged: str, model_config: ModelConfig, tp_rank: int, tp_size: int) -> list[tuple[int, int]]:
    """Per slice of ``merged``, (first row in the full slice, rows) that rank ``tp_rank`` of ``tp_size`` holds:
    the ranges ``QKVParallelLinear`` / ``MergedColumnParallelLinear`` load for that rank."""
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"no rank {tp_rank} among {tp_size} tensor-parallel ranks")
    if merged == "gate_up_proj":
        local = divide(model_config.intermediate_size, tp_size, "output features")
        return [(tp_rank * local, local)] * 2
    head_dim = model_config.head_dim
    q = divide(model_config.num_attention_heads, tp_size, "number of attention heads") * head_dim
    num_kv = model_config.num_key_value_heads
    if num_kv >= tp_size:
        kv = divide(num_kv, tp_size, "number of KV heads") * head_dim
        kv_start = tp_rank * kv
    else:  # each KV head on tp_size / num_kv consecutive ranks
        kv = head_dim
        kv_start = tp_rank // divide(tp_size, num_kv, "tensor-parallel size over KV heads") * head_dim
    return [(tp_rank * q, q), (kv_start, kv), (kv_start, kv)]


def shard_merged_lora(full: MergedLoRA, merged: str, model_config: ModelConfig, tp_rank: int,
                      tp_size: int) -> MergedLoRA:
    """Rank ``tp_rank``'s part of ``full`` (from ``merged_lora``): A replicated, each B narrowed to the rows the
    base layer holds on that rank, offsets in the rank's local output."""
    bs: list[torch.Tensor] = []
    offsets: list[int] = []
    offset = 0
    for b, (start, rows) in zip(full.bs, column_shard_ranges(merged, model_config, tp_rank, tp_size)):
        bs.append(b.narrow(0, start, rows))
        offsets.append(offset)
        offset += rows
    return MergedLoRA(a=full.a, bs=tuple(bs), offsets=tuple(offsets))


def shard_row_lora(a: torch.Tensor, b: torch.Tensor, tp_rank: int, tp_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``tp_rank``'s part of a row-parallel projection's (A [r, in], B [out, r]): A's input columns that
    ``RowParallelLinear`` gives the rank, B whole."""
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"no rank {tp_rank} among {tp_size} tensor-parallel ranks")
    local_in = divide(a.shape[1], tp_size, "input features")
    return a.narrow(1, tp_rank * local_in, local_in), b
