"""Mixture-of-experts feed-forward layers: the routed experts' weights (``FusedMoE``) and the sparse block that
routes tokens to them and adds the shared experts (``SparseMoeBlock``).

Tensor parallelism splits every expert's intermediate dimension over the ranks (the gate/up rows and the down
columns of each expert, like a dense MLP), so every rank runs every expert on every token it routes and holds a
partial sum of the output; routed and shared experts' partial sums are added before the block's single
all-reduce.  FP8 experts (a block-FP8 checkpoint, or ``--quantization fp8``) are described in
``radixlm.layers.fp8_moe``.
"""

from __future__ import annotations

import torch
from torch import nn

from radixlm.config import ModelConfig
from radixlm.config.quant_config import QuantConfig
from radixlm.distributed import divide, get_tp_group
from radixlm.kernels.fp8 import FP8_DTYPE, dequantize_block_fp8
from radixlm.kernels.fused_moe import fused_experts, fused_experts_torch
from radixlm.layers import fp8_moe
from radixlm.layers.fp8_linear import cdiv, new_param
from radixlm.layers.moe_router import Routing, TopKRouter

# Checkpoint names of an expert's three projections, by family: (gate, up, down).
EXPERT_PROJ_NAMES = {
    "llama": ("gate_proj", "up_proj", "down_proj"),  # DeepSeek, Qwen3-MoE
    "mixtral": ("w1", "w3", "w2"),
}


def expert_params_mapping(num_experts: int, names: tuple[str, str, str] = EXPERT_PROJ_NAMES["llama"]
                          ) -> list[tuple[str, str, object]]:
    """Entries for ``load_named_weights``' stacked mapping: checkpoint ``experts.{e}.{gate,up,down}.weight`` ->
    our stacked ``experts.gate_up_proj`` (shards ``(e, "gate")``, ``(e, "up")``) and ``experts.down_proj`` (shard
    ``(e, "down")``); an FP8 checkpoint's ``...weight_scale_inv`` likewise to ``experts.gate_up_proj_scale_inv``
    and ``experts.down_proj_scale_inv``."""
    gate, up, down = names
    mapping: list[tuple[str, str, object]] = []
    for e in range(num_experts):
        for suffix in ("weight", "weight_scale_inv"):
            ours = "" if suffix == "weight" else "_scale_inv"
            mapping += [(f"experts.gate_up_proj{ours}", f"experts.{e}.{gate}.{suffix}", (e, "gate")),
                        (f"experts.gate_up_proj{ours}", f"experts.{e}.{up}.{suffix}", (e, "up")),
                        (f"experts.down_proj{ours}", f"experts.{e}.{down}.{suffix}", (e, "down"))]
    return mapping


class FusedMoE(nn.Module):
    """The routed experts as two stacked weights, this rank's slice of each expert's intermediate dimension:

    - ``gate_up_proj`` [num_experts, 2 * inter / tp, hidden]: gate rows, then up rows
    - ``down_proj``    [num_experts, hidden, inter / tp]

    Under a ``QuantConfig`` both are float8_e4m3fn with block scales ``gate_up_proj_scale_inv`` and
    ``down_proj_scale_inv`` of ``block_shape`` (``radixlm.layers.fp8_moe``): parameters loaded from an FP8
    checkpoint, or made by ``finish_loading`` from the model-dtype weights (online).

    ``forward`` returns this rank's partial sum (the caller all-reduces)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, dtype: torch.dtype,
                 quant: QuantConfig | None = None):
        super().__init__()
        self.tp = get_tp_group()
        self.num_experts = num_experts
        self.local_inter = divide(intermediate_size, self.tp.size, "MoE intermediate size")
        self.quant = quant
        inter, local = intermediate_size, self.local_inter
        self.block_shape = None if quant is None else fp8_moe.expert_block(quant, hidden_size, local)
        if self.block_shape is not None:
            fp8_moe.check_expert_blocks(hidden_size, local, self.block_shape, self.tp.size)
        from_checkpoint = quant is not None and quant.from_checkpoint
        w_dtype = FP8_DTYPE if from_checkpoint else dtype
        self.gate_up_proj = new_param((num_experts, 2 * local, hidden_size), w_dtype, self._load_gate_up,
                                      {(e, part): (inter, hidden_size)
                                       for e in range(num_experts) for part in ("gate", "up")})
        self.down_proj = new_param((num_experts, hidden_size, local), w_dtype, self._load_down,
                                   {(e, "down"): (hidden_size, inter) for e in range(num_experts)})
        if from_checkpoint:
            bn, bk = self.block_shape
            self.gate_up_proj_scale_inv = new_param(
                (num_experts, 2 * local // bn, cdiv(hidden_size, bk)), torch.float32, self._load_gate_up,
                {(e, part): (inter // bn, cdiv(hidden_size, bk))
                 for e in range(num_experts) for part in ("gate", "up")})
            self.down_proj_scale_inv = new_param(
                (num_experts, cdiv(hidden_size, bn), local // bk), torch.float32, self._load_down,
                {(e, "down"): (cdiv(hidden_size, bn), inter // bk) for e in range(num_experts)})

    def _load_gate_up(self, param: nn.Parameter, loaded: torch.Tensor, shard: tuple[int, str]) -> None:
        """This rank's rows of one expert's gate or up matrix (or of its block scales: whole blocks, by
        ``check_expert_blocks``) into the gate or up half of ``param``."""
        expert, part = shard
        half = param.shape[1] // 2  # local_inter rows, or local_inter / bn scale rows
        offset = 0 if part == "gate" else half
        param.data[expert].narrow(0, offset, half).copy_(loaded.narrow(0, self.tp.rank * half, half))

    def _load_down(self, param: nn.Parameter, loaded: torch.Tensor, shard: tuple[int, str]) -> None:
        """This rank's columns of one expert's down matrix (or of its block scales)."""
        expert, _ = shard
        cols = param.shape[2]  # local_inter columns, or local_inter / bk scale columns
        param.data[expert].copy_(loaded.narrow(1, self.tp.rank * cols, cols))

    def finish_loading(self) -> None:
        """After the checkpoint is in: quantize online-FP8 experts (the parameters replaced by fp8 ones, the
        scales registered as buffers under the checkpoint form's names)."""
        if self.quant is None or self.quant.from_checkpoint or self.gate_up_proj.dtype == FP8_DTYPE:
            return
        for name in ("gate_up_proj", "down_proj"):
            w, scale = fp8_moe.quantize_experts(getattr(self, name).data, self.block_shape)
            setattr(self, name, nn.Parameter(w, requires_grad=False))
            self.register_buffer(f"{name}_scale_inv", scale)

    def dequantized_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """FP8 experts in float32 (gate_up, down), made once: the CPU path's weights (they do not change after
        loading)."""
        cached = self.__dict__.get("_dequantized")
        if cached is None:
            cached = self.__dict__["_dequantized"] = (
                dequantize_block_fp8(self.gate_up_proj, self.gate_up_proj_scale_inv, self.block_shape),
                dequantize_block_fp8(self.down_proj, self.down_proj_scale_inv, self.block_shape))
        return cached

    def forward(self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """``hidden`` [num_tokens, hidden], ``topk_*`` [num_tokens, top_k] -> partial output [num_tokens, hidden].
        FP8 experts: the block-scaled Triton kernel on CUDA; elsewhere the cached dequantized experts with the
        activations rounded as that kernel quantizes them (``fused_experts_torch``'s ``act_group``)."""
        if self.quant is None:
            return fused_experts(hidden, self.gate_up_proj, self.down_proj, topk_weights, topk_ids)
        if hidden.is_cuda:
            return fused_experts(hidden, self.gate_up_proj, self.down_proj, topk_weights, topk_ids,
                                 self.gate_up_proj_scale_inv, self.down_proj_scale_inv, self.block_shape)
        w13, w2 = self.dequantized_weights()
        return fused_experts_torch(hidden, w13, w2, topk_weights, topk_ids, act_group=self.block_shape[1])


class SparseMoeBlock(nn.Module):
    """``sum_k w_k * expert_{id_k}(x) + shared_experts(x)``: the router (``gate``), the routed ``experts`` and,
    for DeepSeek, ``shared_experts`` (a module every token goes through, returning its partial sum un-reduced),
    with one all-reduce."""

    def __init__(self, config: ModelConfig, routing: Routing, expert_intermediate_size: int,
                 shared_experts: nn.Module | None = None):
        super().__init__()
        self.tp = get_tp_group()
        self.gate = TopKRouter(config.hidden_size, routing, config.dtype)
        self.experts = FusedMoE(routing.num_experts, config.hidden_size, expert_intermediate_size, config.dtype,
                                config.quant)
        self.shared_experts = shared_experts

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        topk_weights, topk_ids = self.gate(hidden)  # [num_tokens, top_k] each
        out = self.experts(hidden, topk_weights, topk_ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden)
        return self.tp.all_reduce(out)
