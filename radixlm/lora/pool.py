"""The adapter memory pool: device slots holding adapters in the layout of the layers they modify, and adapters in
host memory in this TP rank's layout, ready to be copied into a slot.

The pool has one ``LoraWeights`` (``radixlm.kernels.lora``) per decoder layer and per *group*, a projection of the
engine's model that adapters modify: ``qkv_proj`` (slices q, k, v), ``o_proj``, ``gate_up_proj`` (slices gate,
up) and ``down_proj``; only the groups ``--lora-target-modules`` lets adapters touch exist.  Each holds
``num_slots`` adapters at ``max_rank``::

    a_pool [num_slots, num_slices * max_rank, in_local]     slice s's A in rows [s * max_rank, s * max_rank + r)
    b_pool [num_slots, out_local, max_rank]                 B in columns [0, r)
    ranks  [num_slots] int32                                r, or 0 where the slot's adapter leaves the group of
                                                            this layer alone (the kernels then skip it)

With ``dense`` (a GPU pool), each group's ``a_pool`` is stored below the layer's base weight, in one
``[out_local + num_slots * num_slices * max_rank, in_local]`` tensor (``LoraWeights.weight_ext``; the layer's
``weight`` becomes a view of its head), so that a decode step's base GEMM computes every slot's shrink too
(``radixlm.kernels.lora``, "Dense decode"); a layer with a bias gets ``bias_ext`` (the bias, then zeros) the same
way.

``ranks`` of every layer and group are views into one ``[num_layers, num_groups, num_slots]`` tensor and the
``scalings`` ([num_slots] float32) are shared by all of them: an adapter's scaling is the same everywhere.
The pool is attached to the model's projections (their ``lora_weights``) once, when it is created; writing a
slot changes what those tensors hold, never which tensors they are (CUDA graphs read them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from radixlm.config.model_config import ModelConfig
from radixlm.kernels.lora import LoraWeights
from radixlm.lora.adapter import LoRAAdapter
from radixlm.lora.layout import MERGED_PROJECTIONS, merged_lora, shard_merged_lora, shard_row_lora

# Group -> the PEFT modules it holds, in the order of its output slices.
GROUP_MODULES: dict[str, tuple[str, ...]] = {
    "qkv_proj": MERGED_PROJECTIONS["qkv_proj"],
    "o_proj": ("o_proj",),
    "gate_up_proj": MERGED_PROJECTIONS["gate_up_proj"],
    "down_proj": ("down_proj",),
}


def pool_groups(allowed_modules: frozenset[str]) -> tuple[str, ...]:
    """The groups with at least one module adapters may modify, in ``GROUP_MODULES`` order."""
    return tuple(g for g, modules in GROUP_MODULES.items() if allowed_modules.intersection(modules))


@dataclass(frozen=True)
class HostLoRA:
    """An adapter in this TP rank's layout, in host memory (pinned when the pool is on a GPU, so the copies into a
    slot do not wait for the device).

    ``weights[(layer, group)] = (A [num_slices * r, in_local], B [out_local, r])`` where the adapter modifies the
    group (a slice it leaves alone is zero); ``ranks`` [num_layers, num_groups] int32: r there, else 0;
    ``scaling`` [1] float32."""

    adapter: LoRAAdapter
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    ranks: torch.Tensor
    scaling: torch.Tensor


def shard_adapter(adapter: LoRAAdapter, model_config: ModelConfig, groups: tuple[str, ...], tp_rank: int,
                  tp_size: int, pin: bool) -> HostLoRA:
    """``adapter`` in rank ``tp_rank``'s layout (``radixlm.lora.layout``) for the pool's ``groups``."""
    num_layers = model_config.num_hidden_layers
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    ranks = torch.zeros(num_layers, len(groups), dtype=torch.int32)
    for layer in range(num_layers):
        for g, group in enumerate(groups):
            if group in MERGED_PROJECTIONS:
                full = merged_lora(adapter, layer, group, model_config)
                if full is None:
                    continue
                shard = shard_merged_lora(full, group, model_config, tp_rank, tp_size)
                a, b = shard.a, torch.cat(shard.bs)
            else:
                pair = adapter.weights.get((layer, group))
                if pair is None:
                    continue
                a, b = shard_row_lora(*pair, tp_rank, tp_size)
            weights[(layer, group)] = (a.contiguous(), b.contiguous())
            ranks[layer, g] = adapter.rank
    scaling = torch.tensor([adapter.scaling], dtype=torch.float32)
    if pin:
        weights = dict(zip(weights, _pinned_pairs(list(weights.values()))))
        ranks, scaling = ranks.pin_memory(), scaling.pin_memory()
    return HostLoRA(adapter, weights, ranks, scaling)


def _pinned_pairs(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of ``pairs`` (one dtype) as views into one pinned buffer: one pinned allocation per adapter instead
    of two per layer and group."""
    flat = torch.empty(sum(a.numel() + b.numel() for a, b in pairs), dtype=pairs[0][0].dtype, pin_memory=True)
    out, offset = [], 0
    for pair in pairs:
        views = []
        for t in pair:
            views.append(flat[offset:offset + t.numel()].view(t.shape).copy_(t))
            offset += t.numel()
        out.append((views[0], views[1]))
    return out


def _extend_below(module: nn.Module, rows: int, dtype: torch.dtype,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Move ``module.weight`` (and its bias, if any) into the head of new tensors with ``rows`` zero rows (zero
    entries) below; the parameters become views of the heads, so loaders and the base path see what they saw."""
    weight = module.weight
    if weight.dtype != dtype or weight.device != device:
        raise ValueError(f"a dense LoRA pool in {dtype} on {device} cannot extend a {weight.dtype} weight on "
                         f"{weight.device}")
    out_local, in_local = weight.shape
    ext = torch.zeros(out_local + rows, in_local, dtype=dtype, device=device)
    ext[:out_local].copy_(weight.data)
    weight.data = ext[:out_local]
    bias = getattr(module, "bias", None)
    if bias is None:
        return ext, None
    bias_ext = torch.zeros(out_local + rows, dtype=bias.dtype, device=device)
    bias_ext[:out_local].copy_(bias.data)
    bias.data = bias_ext[:out_local]
    return ext, bias_ext


class LoRAPool:
    """The device slots (module docstring), attached to ``projections``: per decoder layer, group name -> the
    model's linear layer for it (a ``ColumnParallelLinear`` for qkv/gate_up, a ``RowParallelLinear`` for o/down;
    its ``weight`` [out_local, in_local] gives the shapes)."""

    def __init__(self, projections: list[dict[str, nn.Module]], groups: tuple[str, ...], num_slots: int,
                 max_rank: int, dtype: torch.dtype, device: torch.device, dense: bool = False):
        self.groups = groups
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.ranks = torch.zeros(len(projections), len(groups), num_slots, dtype=torch.int32, device=device)
        self.scalings = torch.zeros(num_slots, dtype=torch.float32, device=device)
        self.weights: dict[tuple[int, str], LoraWeights] = {}
        for layer, modules in enumerate(projections):
            for g, group in enumerate(groups):
                module = modules[group]
                out_local, in_local = module.weight.shape
                slice_sizes = getattr(module, "local_sizes", [out_local])  # a row-parallel layer: one slice
                if len(slice_sizes) != len(GROUP_MODULES[group]):
                    raise ValueError(f"layer {layer}'s {group} has {len(slice_sizes)} output slices; LoRA expects "
                                     f"{len(GROUP_MODULES[group])} ({', '.join(GROUP_MODULES[group])})")
                offsets = torch.tensor([0] + slice_sizes, dtype=torch.int32).cumsum(0).to(torch.int32)
                a_shape = (num_slots, len(slice_sizes) * max_rank, in_local)
                weight_ext = bias_ext = None
                if dense:
                    weight_ext, bias_ext = _extend_below(module, a_shape[0] * a_shape[1], dtype, device)
                    a_pool = weight_ext[out_local:].view(a_shape)
                else:
                    a_pool = torch.zeros(a_shape, dtype=dtype, device=device)
                weights = LoraWeights(
                    a_pool=a_pool, b_pool=torch.zeros(num_slots, out_local, max_rank, dtype=dtype, device=device),
                    ranks=self.ranks[layer, g], scalings=self.scalings, slice_offsets=offsets.to(device),
                    weight_ext=weight_ext, bias_ext=bias_ext)
                self.weights[(layer, group)] = weights
                module.lora_weights = weights

    def write(self, slot: int, host: HostLoRA) -> None:
        """Copy ``host`` into ``slot``, on the current stream (so after any queued step that still reads the slot's
        previous adapter; from pinned memory without waiting for the device)."""
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"no slot {slot} in a pool of {self.num_slots}")
        r = host.adapter.rank
        for (layer, group), (a, b) in host.weights.items():
            pool = self.weights[(layer, group)]
            num_slices = len(GROUP_MODULES[group])
            in_local = pool.a_pool.shape[2]
            # Rows beyond r are stale; the kernels read none of them.
            pool.a_pool[slot].view(num_slices, self.max_rank, in_local)[:, :r].copy_(
                a.view(num_slices, r, in_local), non_blocking=True)
            pool.b_pool[slot, :, :r].copy_(b, non_blocking=True)
        self.ranks[:, :, slot].copy_(host.ranks, non_blocking=True)
        self.scalings[slot:slot + 1].copy_(host.scaling, non_blocking=True)

    def bytes(self) -> int:
        """Device bytes of the slots and their metadata."""
        tensors = [t for w in self.weights.values() for t in (w.a_pool, w.b_pool, w.slice_offsets)]
        return sum(t.numel() * t.element_size() for t in tensors + [self.ranks, self.scalings])
