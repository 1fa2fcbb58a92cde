"""Tensor-parallel linear layers.  Each parameter carries a ``weight_loader`` that shards a full checkpoint
tensor at load time, and ``checkpoint_shapes`` (shard id -> full shape) so dummy weights can be generated in
checkpoint layout and go through the same loader, identical for every TP size.

Layouts follow torch: ``weight`` is ``[out_features, in_features]``.

LoRA: a column- or row-parallel layer that adapters may modify holds its slice of the adapter pool in
``lora_weights`` (``radixlm.lora.pool`` attaches it once, at startup); ``forward(x, lora)`` adds the batch's
adapters (``lora``: its segments, from the forward batch) to the base output.  ``lora`` None, or a batch without
adapters, adds nothing and launches nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from radixlm.config.quant_config import QuantConfig
from radixlm.distributed import TPGroup, divide, get_tp_group
from radixlm.kernels import cpu
from radixlm.kernels.fp8_activation import ActivationQuant, FP8Activation
from radixlm.kernels.lora import LoraSegments, LoraWeights, lora_forward, lora_silu_mul_forward
from radixlm.layers import fp8_linear


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


class QuantizableLinear(nn.Module):
    """What the linear layers share: ``weight`` [out, in] in the model dtype, or FP8 under a ``QuantConfig``
    (``radixlm.layers.fp8_linear``: block-wise from the checkpoint with ``weight_scale_inv``, or online with
    ``weight_scale`` after ``finish_loading``); ``matmul(x)`` is ``x @ W^T`` whichever it is.

    ``input_quant``: how an FP8 layer quantizes its input (None when unquantized).  A kernel producing the input
    may do it instead and pass an ``FP8Activation`` (CUDA only), which ``forward`` takes in place of a tensor."""

    quant: QuantConfig | None = None
    input_quant: ActivationQuant | None = None

    def _init_weight(self, out: int, in_features: int, dtype: torch.dtype, checkpoint_shapes: dict,
                     quant: QuantConfig | None, scale_loader=None) -> None:
        self.quant = quant
        self.input_quant = fp8_linear.input_quant(quant, in_features)
        block = quant is not None and quant.from_checkpoint
        self.weight = _param((out, in_features), torch.float8_e4m3fn if block else dtype, self.weight_loader,
                             checkpoint_shapes)
        if block:
            bn, bk = quant.weight_block
            if in_features % bk:
                raise ValueError(f"a linear layer with {in_features} input features (per rank) under the FP8 "
                                 f"checkpoint's {bk}-wide K blocks: the activations are quantized per group of {bk} "
                                 f"channels, so the input size must be a multiple of it")
            self.weight_scale_inv = _param(
                (fp8_linear.cdiv(out, bn), fp8_linear.cdiv(in_features, bk)), torch.float32,
                scale_loader or default_weight_loader,
                {k: (fp8_linear.cdiv(o, bn), fp8_linear.cdiv(i, bk)) for k, (o, i) in checkpoint_shapes.items()})

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        default_weight_loader(param, loaded)

    def matmul(self, x: torch.Tensor | FP8Activation) -> torch.Tensor:
        if self.quant is None:
            return linear(x, self.weight)
        return fp8_linear.fp8_forward(self, x)

    def finish_loading(self) -> None:
        fp8_linear.finish_loading(self, self.quant)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The local weight in ``dtype``: the parameter itself when it is not quantized, else a dequantized copy
        made once (weights do not change after loading; DeepSeek's absorbed ``kv_b_proj`` reads it every step)."""
        if self.quant is None:
            return self.weight
        return fp8_linear.cached_dequantized(self, dtype)


def _with_lora(layer: "ColumnParallelLinear | RowParallelLinear", x: torch.Tensor | FP8Activation,
               base: Callable[[], torch.Tensor], lora: LoraSegments | None, bias_in_matmul: bool) -> torch.Tensor:
    """``base()`` (this rank's output of the projection, ``[num_tokens, out_local]``, before any collective) plus
    the batch's adapters' ``scaling * x A^T B^T`` (``radixlm.kernels.lora.lora_forward``: a GPU decode step
    computes the shrink in the base GEMM, over the weight with the pool's A rows below it)."""
    if lora is None or layer.lora_weights is None or not lora.has_lora:
        return base()
    if isinstance(x, FP8Activation):
        raise ValueError("LoRA needs the unquantized input of the projection (LoRA does not combine with FP8)")
    return lora_forward(x, base, layer.lora_weights, lora, bias_in_matmul)


class ReplicatedLinear(QuantizableLinear):
    """The full matrix on every rank: for projections whose whole output every rank needs (DeepSeek's
    ``q_a_proj`` and ``kv_a_proj_with_mqa``, which produce the low-rank latents shared by all heads)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype = torch.float32,
                 quant: QuantConfig | None = None):
        super().__init__()
        self._init_weight(out_features, in_features, dtype, {None: (out_features, in_features)}, quant)
        self.bias = _param((out_features,), dtype, default_weight_loader, {None: (out_features,)}) if bias else None

    def forward(self, x: torch.Tensor | FP8Activation) -> torch.Tensor:
        if self.quant is None:
            return linear(x, self.weight, self.bias)
        y = self.matmul(x)
        return y + self.bias if self.bias is not None else y


class ColumnParallelLinear(QuantizableLinear):
    """Output features split over ranks; each rank computes its slice of ``y``.

    ``output_sizes`` lists the logical sub-matrices stacked along the output dim (one, or several for merged
    projections such as gate+up); each is split evenly, so rank r holds the r-th slice of every sub-matrix.
    Adapters add to this rank's columns, before any gather.
    """

    lora_weights: LoraWeights | None = None

    def __init__(
        self,
        in_features: int,
        output_sizes: list[int],
        bias: bool = False,
        gather_output: bool = False,
        dtype: torch.dtype = torch.float32,
        quant: QuantConfig | None = None,
        tp: TPGroup | None = None,
    ):
        super().__init__()
        self.tp = tp if tp is not None else get_tp_group()
        self.in_features = in_features
        self.output_sizes = output_sizes
        self.local_sizes = self._local_sizes()
        self.gather_output = gather_output
        out = sum(self.local_sizes)
        shapes = self._checkpoint_shapes()
        if quant is not None and quant.from_checkpoint and (self.tp.size > 1 or len(self.local_sizes) > 1):
            for size in self.local_sizes:  # every sub-matrix's rows must start on a scale block
                fp8_linear.check_block_split("output features", size, quant.weight_block[0], 2)
        self._init_weight(out, in_features, dtype, {k: (s, in_features) for k, s in shapes.items()}, quant,
                          self._scale_loader)
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

    def _scale_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        """The block scales of the rows ``weight_loader`` takes (they start on block boundaries)."""
        bn = self.quant.weight_block[0]
        dst_offset, size, src_offset = self._shard_range(shard_id)
        rows = fp8_linear.cdiv(size, bn)
        param.data.narrow(0, dst_offset // bn, rows).copy_(loaded.narrow(0, src_offset // bn, rows))

    def forward(self, x: torch.Tensor | FP8Activation, lora: LoraSegments | None = None) -> torch.Tensor:
        y = _with_lora(self, x, lambda: self._base_forward(x), lora, bias_in_matmul=True)
        return self.tp.all_gather(y, dim=-1) if self.gather_output else y

    def _base_forward(self, x: torch.Tensor | FP8Activation) -> torch.Tensor:
        if self.quant is None:
            return linear(x, self.weight, self.bias)
        y = self.matmul(x)
        return y + self.bias if self.bias is not None else y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one matmul (e.g. gate_proj and up_proj)."""

    def lora_silu_mul(self, x: torch.Tensor | FP8Activation, lora: LoraSegments | None) -> torch.Tensor | None:
        """For gate ‖ up: ``silu(gate) * up`` of this rank's output with the batch's adapters, in one kernel after
        the GEMM, when the batch takes the dense LoRA decode (``radixlm.kernels.lora.lora_silu_mul_forward``);
        None otherwise (the caller runs ``forward`` and then the activation)."""
        weights = self.lora_weights
        if (lora is None or not lora.has_lora or not lora.dense or weights is None or weights.weight_ext is None
                or self.gather_output or len(self.local_sizes) != 2 or self.local_sizes[0] != self.local_sizes[1]
                or isinstance(x, FP8Activation)):
            return None
        return lora_silu_mul_forward(x, weights, lora)


class QKVParallelLinear(ColumnParallelLinear):
    """Q, K and V projections in one matmul, split by heads.

    When there are fewer KV heads than ranks, each KV head is replicated on ``tp_size / num_kv_heads`` ranks.
    Checkpoint shard ids are ``"q"``, ``"k"``, ``"v"``.
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, dtype: torch.dtype = torch.float32, quant: QuantConfig | None = None):
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
                         bias=bias, dtype=dtype, quant=quant)

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


class RowParallelLinear(QuantizableLinear):
    """Input features split over ranks; partial products are summed with an all-reduce, then the bias added.

    ``reduce_results=False`` returns this rank's partial product: a caller that sums several partial outputs
    (an MoE layer's routed and shared experts) all-reduces once, after the sum.  ``tp``: the group it is split
    over (default: the TP group).  Adapters add their partial products (A split like the weight) to this rank's
    partial product, before the all-reduce: the reduction sums them too (``radixlm.lora.layout``)."""

    lora_weights: LoraWeights | None = None

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype = torch.float32,
                 reduce_results: bool = True, quant: QuantConfig | None = None, tp: TPGroup | None = None):
        super().__init__()
        if bias and not reduce_results:
            raise ValueError("a row-parallel bias is added after the reduction; it needs reduce_results")
        self.tp = tp if tp is not None else get_tp_group()
        self.reduce_results = reduce_results
        self.local_in = divide(in_features, self.tp.size, "input features")
        if quant is not None and quant.from_checkpoint:
            fp8_linear.check_block_split("input features", self.local_in, quant.weight_block[1], self.tp.size)
        self._init_weight(out_features, self.local_in, dtype, {None: (out_features, in_features)}, quant,
                          self._scale_loader)
        self.bias = _param((out_features,), dtype, self.weight_loader, {None: (out_features,)}) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if param.dim() == 1:  # bias: replicated
            default_weight_loader(param, loaded)
        else:
            param.data.copy_(loaded.narrow(1, self.tp.rank * self.local_in, self.local_in))

    def _scale_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        cols = fp8_linear.cdiv(self.local_in, self.quant.weight_block[1])
        param.data.copy_(loaded.narrow(1, self.tp.rank * cols, cols))

    def forward(self, x: torch.Tensor | FP8Activation, lora: LoraSegments | None = None) -> torch.Tensor:
        y = _with_lora(self, x, lambda: self.matmul(x), lora, bias_in_matmul=False)
        if not self.reduce_results:
            return y
        y = self.tp.all_reduce(y)
        return y + self.bias if self.bias is not None else y
