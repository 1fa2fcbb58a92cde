"""Tensor-parallel process groups.

The groups are created once, before the model is built, and never change afterwards: layers read them at
construction time (``get_tp_group()``, ``get_attn_tp_group()``, ``get_dp_attention()``) and keep a reference, so
nothing deep inside a forward pass looks up mutable global state.  With ``tp_size == 1`` every collective is a
no-op and torch.distributed is not needed.

Data-parallel attention (``--enable-dp-attention --dp-size D``) splits the ``tp_size`` ranks into D consecutive
attention groups of ``A = tp_size / D`` ranks: DP rank d owns TP ranks ``[d * A, (d + 1) * A)``.  Each DP rank
serves its own requests with its own KV cache; attention (and the vocabulary-parallel embedding and LM head) is
tensor-parallel within its attention group, the feed-forward over the whole TP group
(``radixlm.distributed.dp_attention``).  Without it the attention group is the TP group.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

# NVLink multicast (NVLS) is off on the lent multi-GPU machines; every process we start inherits this.
_NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass(frozen=True)
class TPGroup:
    """One tensor-parallel group: this process's rank, the group size, the device process group (NCCL on CUDA,
    gloo on CPU) for tensors, and a gloo group for the scheduler's control messages: a pickled object sent over
    NCCL would go through device memory and make the host wait for the GPU work queued before it.

    The process groups are held weakly: torch.distributed's registry owns them, so ``destroy_tensor_parallel``
    frees them (joining gloo's worker threads while the interpreter is alive) even though layers keep this
    object.  A gloo worker left to drop its last finished work during interpreter shutdown needs the GIL to
    release the work's tensors and aborts the process instead."""

    rank: int = 0
    size: int = 1
    group_ref: weakref.ref | None = None
    cpu_group_ref: weakref.ref | None = None

    @property
    def group(self) -> dist.ProcessGroup | None:
        return _live(self.group_ref)

    @property
    def cpu_group(self) -> dist.ProcessGroup | None:
        return _live(self.cpu_group_ref)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the group, in place; returns ``x``."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's ``x`` along ``dim`` in rank order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def all_gather_object(self, obj: object) -> list[object]:
        """Every rank's picklable ``obj``, in rank order (CPU-side control messages)."""
        if self.size == 1:
            return [obj]
        out: list[object] = [None] * self.size
        dist.all_gather_object(out, obj, group=self.cpu_group)
        return out

    def broadcast_object(self, obj: object, src: int = 0) -> object:
        """Send a picklable object from ``src`` to every rank (CPU-side control messages)."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.cpu_group)
        return box[0]


def _live(ref: weakref.ref | None) -> dist.ProcessGroup | None:
    if ref is None:
        return None
    group = ref()
    if group is None:
        raise RuntimeError("the tensor-parallel group was destroyed")
    return group


@dataclass(frozen=True)
class DPAttention:
    """This process's place under data-parallel attention: DP rank ``rank`` of ``size``, its attention group
    ``attn_tp`` (the ranks sharing its requests and KV cache) and the whole TP group ``tp`` (the feed-forward's).
    ``size == 1``: DP attention is off and ``attn_tp`` is ``tp``."""

    rank: int = 0
    size: int = 1
    attn_tp: TPGroup = TPGroup()
    tp: TPGroup = TPGroup()

    @property
    def enabled(self) -> bool:
        return self.size > 1


_TP_GROUP = TPGroup()
_DP_ATTENTION = DPAttention()


def init_tensor_parallel(tp_rank: int, tp_size: int, device: torch.device, init_method: str,
                         dp_size: int = 1, timeout_s: float | None = None) -> TPGroup:
    """Join the tensor-parallel group (NCCL on CUDA, gloo on CPU) and make it the process's TP group; with
    ``dp_size > 1`` (data-parallel attention) also create the ``dp_size`` attention groups (every rank takes part
    in creating each of them, as torch.distributed requires) and keep this rank's.  ``timeout_s``: how long the
    rendezvous and the collectives wait for the other ranks (None: torch's default)."""
    global _TP_GROUP, _DP_ATTENTION
    if dp_size < 1 or tp_size % dp_size:
        raise ValueError(f"the data-parallel attention size ({dp_size}) must divide the tensor-parallel size "
                         f"({tp_size})")
    attn_size = tp_size // dp_size
    if tp_size == 1:
        _TP_GROUP, _DP_ATTENTION = TPGroup(), DPAttention()
        return _TP_GROUP
    set_multi_gpu_env()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=init_method, world_size=tp_size, rank=tp_rank,
                                device_id=device if backend == "nccl" else None,
                                timeout=None if timeout_s is None else datetime.timedelta(seconds=timeout_s))
    cpu_group = dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD
    _TP_GROUP = TPGroup(rank=tp_rank, size=tp_size, group_ref=weakref.ref(dist.group.WORLD),
                        cpu_group_ref=weakref.ref(cpu_group))
    attn_tp = _TP_GROUP
    if dp_size > 1:
        attn_tp = TPGroup()  # one rank per attention group: no collectives, no process groups
        for d in range(dp_size if attn_size > 1 else 0):
            ranks = list(range(d * attn_size, (d + 1) * attn_size))
            group = dist.new_group(ranks, backend=backend)
            attn_cpu = dist.new_group(ranks, backend="gloo") if backend == "nccl" else group
            if tp_rank in ranks:
                attn_tp = TPGroup(rank=tp_rank - ranks[0], size=attn_size, group_ref=weakref.ref(group),
                                  cpu_group_ref=weakref.ref(attn_cpu))
    _DP_ATTENTION = DPAttention(rank=tp_rank // attn_size, size=dp_size, attn_tp=attn_tp, tp=_TP_GROUP)
    return _TP_GROUP


@contextlib.contextmanager
def layout_for_sizing(tp_rank: int, tp_size: int, dp_size: int = 1) -> Iterator[None]:
    """Within the block, the groups of rank ``tp_rank`` of a ``tp_size``-rank layout with ``dp_size`` attention
    groups, without process groups: a model built inside gets that rank's shard shapes (layers read the groups at
    construction), so one process can size any rank's memory (``bench/dp_memory.py``, on the meta device).
    Collectives inside would fail.  The previous groups come back at the end."""
    global _TP_GROUP, _DP_ATTENTION
    if dp_size < 1 or tp_size % dp_size or not 0 <= tp_rank < tp_size:
        raise ValueError(f"no rank {tp_rank} in a layout of {tp_size} ranks and {dp_size} attention groups")
    saved = _TP_GROUP, _DP_ATTENTION
    attn_size = tp_size // dp_size
    tp = TPGroup(rank=tp_rank, size=tp_size)
    attn_tp = tp if dp_size == 1 else TPGroup(rank=tp_rank % attn_size, size=attn_size)
    _TP_GROUP, _DP_ATTENTION = tp, DPAttention(rank=tp_rank // attn_size, size=dp_size, attn_tp=attn_tp, tp=tp)
    try:
        yield
    finally:
        _TP_GROUP, _DP_ATTENTION = saved


def set_multi_gpu_env() -> None:
    """Keep NVLink multicast off (NCCL, PyTorch symmetric memory, NVSHMEM) in this process and every process it
    starts afterwards; a value the user set explicitly wins."""
    for key, value in _NCCL_ENV.items():
        os.environ.setdefault(key, value)


def free_local_addr() -> str:
    """``127.0.0.1:PORT`` with a port free right now: the rendezvous of a single-node TP group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def get_tp_group() -> TPGroup:
    return _TP_GROUP


def get_attn_tp_group() -> TPGroup:
    """The group attention is tensor-parallel over: this DP rank's attention group, or the TP group."""
    return _DP_ATTENTION.attn_tp


def get_dp_attention() -> DPAttention:
    return _DP_ATTENTION


def destroy_tensor_parallel() -> None:
    global _TP_GROUP, _DP_ATTENTION
    if dist.is_initialized():
        dist.barrier()  # gloo aborts a rank whose peer tears down while it is still connected
        dist.destroy_process_group()  # drops the last references (TPGroup's are weak): the groups end here
    _TP_GROUP, _DP_ATTENTION = TPGroup(), DPAttention()


def divide(numerator: int, denominator: int, what: str) -> int:
    """Exact division with an error that names what could not be split."""
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-parallel size ({denominator})")
    return numerator // denominator
