"""``LoRAManager``: one TP rank's adapters, in host memory, and which of them are resident in the device pool.

Loaded adapters live in host memory in this rank's layout (``radixlm.lora.pool.HostLoRA``).  A batch's adapters
are made resident by ``prepare`` just before its forward: a slot is taken free (the lowest one) or from the least
recently used resident adapter the batch does not name, and the adapter copied into it on the current stream.
Every TP rank sees the same loads, unloads and batches in the same order, so every rank picks the same slots.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from radixlm.config import ModelConfig, ServerArgs
from radixlm.core import Batch
from radixlm.kernels.lora import LoraSegments, build_segments, decode_segments
from radixlm.lora.adapter import LoRAAdapter, LoRAAdapterError, load_lora_adapter, read_lora_config
from radixlm.lora.pool import HostLoRA, LoRAPool, pool_groups, shard_adapter
from radixlm.utils.device import to_device_async

DEFAULT_MAX_LORA_RANK = 64  # --max-lora-rank without it or --lora-paths
# Prefill segments are cut into pieces of this many tokens (the kernels' largest token tile), so the launch grid
# is one tile per piece instead of the segment count times the longest segment's tiles.
PREFILL_SEGMENT_TOKENS = 64


def resolve_max_lora_rank(server_args: ServerArgs) -> int:
    """``--max-lora-rank``, else the largest rank among ``--lora-paths`` (their configs read and checked:
    LoRAAdapterError for a bad one), else ``DEFAULT_MAX_LORA_RANK``."""
    if server_args.max_lora_rank is not None:
        return server_args.max_lora_rank
    ranks = [read_lora_config(name, path, server_args.lora_allowed_dir).r
             for name, path in server_args.lora_path_map().items()]
    return max(ranks, default=DEFAULT_MAX_LORA_RANK)


def dense_decode(device: torch.device) -> bool:
    """Whether decode steps compute the shrink inside the base GEMM (``LoRAPool(dense=True)``): on GPUs.  A CPU
    model keeps its weights as they are: its linear layers multiply by a packed copy made on first use, and the
    dense GEMM over a weight whose tail changes with the slots would need a fresh one each step."""
    return device.type == "cuda"


class LoRAManager:
    """Adapters of one TP rank (module docstring).  ``model`` must implement ``lora_projections()`` (per decoder
    layer, group name -> linear layer; ValueError for a model LoRA does not support): the pool is attached to
    those layers here, and its device memory allocated, so create the manager before sizing the KV pool.

    ``load_adapter`` / ``unload_adapter`` change the set of adapters (the caller runs them on every TP rank, in
    the same order); ``prepare`` makes a batch's adapters resident and returns its segments."""

    def __init__(self, model: nn.Module, model_config: ModelConfig, server_args: ServerArgs, tp_rank: int,
                 tp_size: int, device: torch.device, max_rank: int):
        self.model_config = model_config
        self.device = device
        self.max_rank = max_rank
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self._allowed_modules = server_args.lora_target_module_set()
        self._allowed_dir = server_args.lora_allowed_dir
        self.dense = dense_decode(device)
        self.pool = LoRAPool(model.lora_projections(), pool_groups(self._allowed_modules),
                             server_args.max_loras_per_batch, max_rank, model_config.dtype, device, dense=self.dense)
        self._host: dict[str, HostLoRA] = {}
        self._resident: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first

    @property
    def adapters(self) -> dict[str, LoRAAdapter]:
        """The loaded adapters by name, in load order (a copy)."""
        return {name: host.adapter for name, host in self._host.items()}

    @property
    def resident(self) -> dict[str, int]:
        """Adapters in a device slot: name -> slot, least recently used first (a copy)."""
        return dict(self._resident)

    @property
    def num_slots(self) -> int:
        return self.pool.num_slots

    def load_adapter(self, name: str, path: str) -> LoRAAdapter:
        """Read, check and shard the adapter at ``path`` into host memory as ``name`` (it reaches a device slot
        when a batch first uses it).  LoRAAdapterError, with nothing changed, for a bad adapter or a name
        already loaded."""
        if name in self._host:
            raise LoRAAdapterError(f"LoRA adapter {name!r} is already loaded; unload it first to replace it")
        adapter = load_lora_adapter(name, path, self.model_config, max_rank=self.max_rank,
                                    allowed_modules=self._allowed_modules, allowed_dir=self._allowed_dir,
                                    dtype=self.model_config.dtype)
        self._host[name] = shard_adapter(adapter, self.model_config, self.pool.groups, self.tp_rank, self.tp_size,
                                         pin=self.device.type == "cuda")
        return adapter

    def unload_adapter(self, name: str) -> None:
        """Forget ``name``: its host copy and its slot (KeyError if it is not loaded).  The caller guarantees
        that no queued or running step uses it."""
        if name not in self._host:
            raise KeyError(f"LoRA adapter {name!r} is not loaded")
        del self._host[name]
        self._resident.pop(name, None)

    def prepare(self, batch: Batch, decode_rows: int | None = None) -> LoraSegments | None:
        """Make every adapter ``batch.lora_names`` names resident and return the batch's segments: decode,
        ``decode_segments``' layout for ``decode_rows`` rows (default: the batch's; a CUDA graph's padded size,
        whose graph then replays it); extend, consecutive rows of one adapter merged and cut into pieces of
        ``PREFILL_SEGMENT_TOKENS``.  None when no row names an adapter (the
        base-only path: nothing uploaded, nothing launched).  ValueError (nothing changed) for an unknown name or
        more distinct adapters than slots."""
        names = batch.lora_names
        if names is None:
            return None
        if len(names) != batch.batch_size:
            raise ValueError(f"lora_names has {len(names)} entries for a batch of {batch.batch_size} rows")
        distinct = list(dict.fromkeys(n for n in names if n is not None))
        if not distinct:
            return None
        unknown = [n for n in distinct if n not in self._host]
        if unknown:
            raise ValueError(f"the batch names LoRA adapters that are not loaded: {', '.join(unknown)}")
        if len(distinct) > self.num_slots:
            raise ValueError(f"the batch names {len(distinct)} distinct LoRA adapters, more than the "
                             f"{self.num_slots} slots (--max-loras-per-batch)")
        for name in distinct:
            if name not in self._resident:
                self._make_resident(name, protected=distinct)
        for name in distinct:  # most recently used last, in the batch's order
            self._resident.move_to_end(name)
        slots = [-1 if n is None else self._resident[n] for n in names]
        if batch.mode.is_decode:
            segments = decode_segments(slots, self.num_slots, "cpu", decode_rows, dense=self.dense)
        else:
            segments = build_segments(slots, batch.extend_lens, "cpu", split=PREFILL_SEGMENT_TOKENS)
        order = segments.token_order
        return segments._replace(seg_starts=to_device_async(segments.seg_starts, self.device),
                                 seg_slots=to_device_async(segments.seg_slots, self.device),
                                 token_order=None if order is None else to_device_async(order, self.device))

    def _make_resident(self, name: str, protected: list[str]) -> None:
        """Copy ``name`` into the lowest free slot, or else the slot of the least recently used resident adapter
        not in ``protected`` (the batch's; there is one, as the batch names no more adapters than slots)."""
        free = set(range(self.num_slots)).difference(self._resident.values())
        if free:
            slot = min(free)
        else:
            victim = next(n for n in self._resident if n not in protected)
            slot = self._resident.pop(victim)
        self.pool.write(slot, self._host[name])
        self._resident[name] = slot
