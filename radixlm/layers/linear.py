"""Tensor-parallel linear layers.  Each parameter carries a ``weight_loader`` that shards a full checkpoint
tensor at load time, and ``checkpoint_shapes`` (shard id -> full shape) so dummy weights can be generated in
checkpoint layout and go through the same loader, identical for every TP size.

Layouts follow torch: ``weight`` is ``[out_features, in_features]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from radixlm.distributed import divide, get_tp_group
from radixlm.kernels import cpu


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``; on CPU through a oneDNN-prepacked copy of the weight (``radixlm.kernels.cpu.linear``)."""
    if cpu.supports_linear(x):
        return cpu.linear(x, weight, bias)
    return F.linear(x, weight, bias)


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit parameter "
                         f"of shape {tuple(param.shape)}")
    param.data.copy_(loaded)


def _param(shape: tuple[int, ...], dtype: torch.dtype, loader, checkpoint_shapes) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    p.weight_loader = loader
    p.checkpoint_shapes = checkpoint_shapes
    return p


class ReplicatedLinear(nn.Module):
    """The full matrix on every rank: for projections whose whole output every rank needs (DeepSeek's
    ``q_a_proj`` and ``kv_a_proj_with_mqa``, which produce the low-rank latents shared by all heads)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.weight = _param((out_features, in_features), dtype, default_weight_loader,
                             {None: (out_features, in_features)})
        self.bias = _param((out_features,), dtype, default_weight_loader, {None: (out_features,)}) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class ColumnParallelLinear(nn.Module):
    """Output features split over ranks; each rank computes its slice of ``y``.

    ``output_sizes`` lists the logical sub-matrices stacked along the output dim (one, or several for merged
    projections such as gate+up); each is split evenly, so rank r holds the r-th slice of every sub-matrix.
    """

    def __init__(
        self,
        in_features: int,
        output_sizes: list[int],
        bias: bool = False,
        gather_output: bool = False,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.tp = get_tp_group()
        self.in_features = in_features
        self.output_sizes = output_sizes
        self.local_sizes = self._local_sizes()
        self.gather_output = gather_output
        out = sum(self.local_sizes)
        shapes = self._checkpoint_shapes()
        self.weight = _param((out, in_features), dtype, self.weight_loader,
                             {k: (s, in_features) for k, s in shapes.items()})
        self.bias = _param((out,), dtype, self.weight_loader, {k: (s,) for k, s in shapes.items()}) if bias else None

    def _local_sizes(self) -> list[int]:
        return [divide(s, self.tp.size, "output features") for s in self.output_sizes]

    def _checkpoint_shapes(self) -> dict[object, int]:
        """Shard id -> full output features of that checkpoint tensor."""
        if len(self.output_sizes) == 1:
            return {None: self.output_sizes[0]}
        return {i: s for i, s in enumerate(self.output_sizes)}

    def _shard_range(self, shard_id: object) -> tuple[int, int, int]:
        """(offset in the local parameter, local size, offset in the full checkpoint tensor)."""
        idx = 0 if shard_id is None else int(shard_id)  # type: ignore[arg-type]
        local = self.local_sizes[idx]
        return sum(self.local_sizes[:idx]), local, self.tp.rank * local

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        dst_offset, size, src_offset = self._shard_range(shard_id)
        param.data.narrow(0, dst_offset, size).copy_(loaded.narrow(0, src_offset, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.bias)
        return self.tp.all_gather(y, dim=-1) if self.gather_output else y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one matmul (e.g. gate_proj and up_proj)."""


class QKVParallelLinear(ColumnParallelLinear):
    """Q, K and V projections in one matmul, split by heads.

    When there are fewer KV heads than ranks, each KV head is replicated on ``tp_size / num_kv_heads`` ranks.
    Checkpoint shard ids are ``"q"``, ``"k"``, ``"v"``.
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, dtype: torch.dtype = torch.float32):
        tp = get_tp_group()
        self.head_dim = head_dim
        self.total_num_heads = num_heads
        self.total_num_kv_heads = num_kv_heads
        self.num_heads = divide(num_heads, tp.size, "number of attention heads")
        if num_kv_heads >= tp.size:
            self.num_kv_heads = divide(num_kv_heads, tp.size, "number of KV heads")
            self.kv_replicas = 1
        else:
            self.kv_replicas = divide(tp.size, num_kv_heads, "tensor-parallel size over KV heads")
            self.num_kv_heads = 1
        super().__init__(hidden_size, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim],
                         bias=bias, dtype=dtype)

    def _checkpoint_shapes(self) -> dict[object, int]:
        return {"q": self.output_sizes[0], "k": self.output_sizes[1], "v": self.output_sizes[2]}

    def _local_sizes(self) -> list[int]:
        return [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim]

    def _shard_range(self, shard_id: object) -> tuple[int, int, int]:
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if shard_id == "q":
            return 0, q, self.tp.rank * q
        kv_rank = self.tp.rank // self.kv_replicas
        return (q if shard_id == "k" else q + kv), kv, kv_rank * kv


class RowParallelLinear(nn.Module):
    """Input features split over ranks; partial products are summed with an all-reduce, then the bias added.

    ``reduce_results=False`` returns this rank's partial product: a caller that sums several partial outputs
    (an MoE layer's routed and shared experts) all-reduces once, after the sum."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype = torch.float32,
                 reduce_results: bool = True):
        super().__init__()
        if bias and not reduce_results:
            raise ValueError("a row-parallel bias is added after the reduction; it needs reduce_results")
        self.tp = get_tp_group()
        self.reduce_results = reduce_results
        self.local_in = divide(in_features, self.tp.size, "input features")
        self.weight = _param((out_features, self.local_in), dtype, self.weight_loader,
                             {None: (out_features, in_features)})
        self.bias = _param((out_features,), dtype, self.weight_loader, {None: (out_features,)}) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if param.dim() == 1:  # bias: replicated
            default_weight_loader(param, loaded)
        else:
            param.data.copy_(loaded.narrow(1, self.tp.rank * self.local_in, self.local_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight)
        if not self.reduce_results:
            return y
        y = self.tp.all_reduce(y)
        return y + self.bias if self.bias is not None else y
