"""FP8 (E4M3) routed experts (``radixlm.layers.moe.FusedMoE``), always in the block-wise format of
``radixlm.kernels.fp8``, so that one kernel, the fused MoE's block-scaled grouped GEMM, serves both sources of
``QuantConfig``:

- from the checkpoint (DeepSeek-V3's format): every expert's ``gate_proj``/``up_proj``/``down_proj`` ``weight`` in
  float8_e4m3fn with a float32 ``weight_scale_inv`` [ceil(out / bn), ceil(in / bk)], stacked per layer as
  ``gate_up_proj`` [E, 2 * inter / tp, hidden] with ``gate_up_proj_scale_inv`` [E, 2 * inter / tp / bn,
  ceil(hidden / bk)] (the gate's scale rows, then the up's) and ``down_proj`` [E, hidden, inter / tp] with
  ``down_proj_scale_inv`` [E, ceil(hidden / bn), inter / tp / bk].
- online (``--quantization fp8``): the experts are loaded in the model dtype, then ``quantize_experts`` rounds
  them in ``online_block`` blocks (128 x 128; smaller only where the per-rank sizes are not multiples of 128).
  Not the per-output-channel scales of the online dense layers (``fp8_linear``): the grouped GEMM applies its
  weight scales per K slice, so block scales need no second kernel variant, and a 128 x 128 block's scale fits
  its values at least as tightly as a whole row's.

Shape rules (``check_expert_blocks``, at construction): the stacked gate/up rows put the up rows right after the
gate's, so the per-rank intermediate size must be a multiple of ``bn`` (else the gate's last scale block would
hold up rows); tensor parallelism must cut the checkpoint's blocks only at their edges; and the activations are
quantized per token per ``bk`` channels, so ``hidden`` and the per-rank intermediate size are multiples of ``bk``.
"""

from __future__ import annotations

import torch

from radixlm.config.quant_config import QuantConfig
from radixlm.kernels.fp8 import FP8_DTYPE, quantize_block_fp8
from radixlm.layers.fp8_linear import check_block_split

ONLINE_BLOCK = 128  # the side of online FP8 experts' scale blocks where the sizes allow it
MIN_ONLINE_BLOCK = 16  # the smallest K tile of the GPU kernel's tl.dot


def online_block(hidden: int, local_inter: int) -> tuple[int, int]:
    """The ``(bn, bk)`` of online FP8 experts: the largest power of two up to 128 dividing both ``hidden`` and the
    per-rank intermediate size (real models: 128; the tiny test models: 32)."""
    side = ONLINE_BLOCK
    while side >= MIN_ONLINE_BLOCK and (hidden % side or local_inter % side):
        side //= 2
    if side < MIN_ONLINE_BLOCK:
        raise ValueError(f"online FP8 experts need the hidden size ({hidden}) and the MoE intermediate size per "
                         f"rank ({local_inter}) to be multiples of {MIN_ONLINE_BLOCK}")
    return side, side


def expert_block(quant: QuantConfig, hidden: int, local_inter: int) -> tuple[int, int]:
    """The scale block of a layer's FP8 experts: the checkpoint's, or ``online_block``."""
    if quant.from_checkpoint:
        return quant.weight_block
    return online_block(hidden, local_inter)


def check_expert_blocks(hidden: int, local_inter: int, block: tuple[int, int], tp_size: int) -> None:
    """Refuse (ValueError) a layer whose sizes the scale blocks do not fit (module docstring)."""
    bn, bk = block
    check_block_split("MoE intermediate size per rank (gate and up stacked)", local_inter, bn, 2)
    check_block_split("MoE intermediate size (down_proj input)", local_inter, bk, tp_size)
    if hidden % bk or local_inter % bk:
        raise ValueError(f"FP8 experts quantize their inputs per group of {bk} channels: the hidden size "
                         f"({hidden}) and the MoE intermediate size per rank ({local_inter}) must be multiples "
                         f"of {bk}")


def quantize_experts(
    w: torch.Tensor,  # [E, N, K] in the model dtype
    block: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:  # [E, N, K] fp8, [E, ceil(N / bn), ceil(K / bk)] float32
    """Online quantization of stacked experts, one expert at a time (the float32 work copy of a whole layer's
    experts would be four times their bf16 size)."""
    q = torch.empty(w.shape, dtype=FP8_DTYPE, device=w.device)
    scales = []
    for e in range(w.shape[0]):
        q[e], scale = quantize_block_fp8(w[e], block)
        scales.append(scale)
    return q, torch.stack(scales)
