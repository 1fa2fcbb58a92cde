"""Tensor-parallel process group.

The group is created once, before the model is built, and never changes afterwards: layers read it at
construction time (``get_tp_group()``) and keep a reference, so nothing deep inside a forward pass looks up
mutable global state.  With ``tp_size == 1`` every collective is a no-op and torch.distributed is not needed.
"""

from __future__ import annotations

import os
import socket
import weakref
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


_TP_GROUP = TPGroup()


def init_tensor_parallel(tp_rank: int, tp_size: int, device: torch.device, init_method: str) -> TPGroup:
    """Join the tensor-parallel group (NCCL on CUDA, gloo on CPU) and make it the process's TP group."""
    global _TP_GROUP
    if tp_size == 1:
        _TP_GROUP = TPGroup()
        return _TP_GROUP
    set_multi_gpu_env()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=init_method, world_size=tp_size, rank=tp_rank,
                                device_id=device if backend == "nccl" else None)
    cpu_group = dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD
    _TP_GROUP = TPGroup(rank=tp_rank, size=tp_size, group_ref=weakref.ref(dist.group.WORLD),
                        cpu_group_ref=weakref.ref(cpu_group))
    return _TP_GROUP


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


def destroy_tensor_parallel() -> None:
    global _TP_GROUP
    if dist.is_initialized():
        dist.barrier()  # gloo aborts a rank whose peer tears down while it is still connected
        dist.destroy_process_group()  # drops the last references (TPGroup's are weak): the groups end here
    _TP_GROUP = TPGroup()


def divide(numerator: int, denominator: int, what: str) -> int:
    """Exact division with an error that names what could not be split."""
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-parallel size ({denominator})")
    return numerator // denominator
