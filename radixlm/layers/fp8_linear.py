"""FP8 (E4M3) weights of the linear layers (``radixlm.layers.linear``), in the two forms of ``QuantConfig``:

- block-wise from the checkpoint: ``weight`` float8_e4m3fn [out, in] and ``weight_scale_inv`` float32
  [ceil(out / bn), ceil(in / bk)]; ``W = weight * weight_scale_inv[row // bn, col // bk]``.  Tensor parallelism
  shards whole blocks: a rank's slice must start and end on block boundaries, else loading refuses the TP size.
- online: weights loaded in the model dtype, then (``quantize_online``) ``weight`` float8_e4m3fn with
  ``weight_scale`` float32 [out], one scale per output channel (``max |row| / 448``).

Activations are quantized per token per group of ``bk`` channels for block weights; for online FP8 per token,
except at decode-sized M (the GEMV's) per token per group of ``ONLINE_DECODE_GROUP`` channels, which the kernels
producing them quantize without the whole row (``input_quant``).  On
CUDA a Triton kernel quantizes them, either the layer's own quantizer or, fused, the norm or SiLU-mul kernel that
produced them (which hands the layer an ``FP8Activation``); then at decode-sized M a Triton GEMV streams the weight
(``radixlm.kernels.fp8_gemv``) and above it the FP8 GEMMs run (``radixlm.kernels.fp8``: the Triton block-scaled
GEMM; cuBLAS's row-wise scaled ``_scaled_mm`` for per-channel weights).  Elsewhere the same rounding in torch over
the dequantized weight, so CPU results show the quantization error the GPU has.
"""

from __future__ import annotations

import torch
from torch import nn

from radixlm.config.quant_config import QuantConfig
from radixlm.kernels.fp8 import FP8_DTYPE, FP8_MAX, dequantize_block_fp8, fp8_block_linear, round_activations
from radixlm.kernels.fp8_activation import ActivationQuant, FP8Activation, quantize_activation

ONLINE_DECODE_GROUP = 128  # activation channels per scale of an online-FP8 linear at decode-sized M


def online_input_quant(in_features: int) -> ActivationQuant:
    """An online-FP8 linear's input quantization: per token (cuBLAS's row-wise GEMM), per 128-channel group at
    the GEMV's M where the input size allows."""
    return ActivationQuant(None, ONLINE_DECODE_GROUP if in_features % ONLINE_DECODE_GROUP == 0 else None)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def check_block_split(what: str, size: int, block: int, shards: int) -> None:
    """A TP shard (or a merged sub-matrix) of ``size`` features, one of ``shards``, must cover whole blocks."""
    if shards > 1 and size % block:
        raise ValueError(f"{what} split into pieces of {size} (tensor parallelism or merged projections) cut the "
                         f"FP8 checkpoint's {block}-wide scale blocks; choose a TP size that leaves multiples of "
                         f"{block}")


def new_param(shape: tuple[int, ...], dtype: torch.dtype, loader, checkpoint_shapes) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    p.weight_loader = loader
    p.checkpoint_shapes = checkpoint_shapes
    return p


def quantize_online(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` [out, in] -> (float8_e4m3fn [out, in], float32 scale [out]): one scale per output channel."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp_min(1e-12)
    return (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def dequantize(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A quantized layer's local weight in ``dtype``."""
    if layer.quant.weight_block is None:
        return (layer.weight.float() * layer.weight_scale[:, None]).to(dtype)
    return dequantize_block_fp8(layer.weight, layer.weight_scale_inv, layer.quant.weight_block).to(dtype)


def cached_dequantized(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """``dequantize(layer, dtype)``, made once per layer (weights do not change after loading)."""
    cached = layer.__dict__.get("_dequantized")
    if cached is None or cached.dtype != dtype:
        cached = layer.__dict__["_dequantized"] = dequantize(layer, dtype)
    return cached


def fp8_channel_linear(
    x: torch.Tensor | FP8Activation, weight: torch.Tensor, weight_scale: torch.Tensor
) -> torch.Tensor:
    """``x`` [*, K] times an online-FP8 ``weight`` [N, K] (float8_e4m3fn, per-channel ``weight_scale`` [N]) with
    ``x`` quantized as ``online_input_quant`` says (an ``FP8Activation`` arrives quantized), on CUDA
    (``fp8_forward`` rounds in torch elsewhere): decode-sized M, and float32 models (cuBLAS's row-wise scaled GEMM
    writes only bf16), through the Triton GEMV; otherwise cuBLAS's row-wise scaled FP8 GEMM."""
    from radixlm.kernels.fp8_gemv import SMALL_M, fp8_gemv

    quant = online_input_quant(weight.shape[1])
    if isinstance(x, FP8Activation):
        x.check(quant)
    else:
        x = quantize_activation(x, quant)  # [M, K] fp8, [M, 1] or [M, K / 128]
    if x.q.shape[0] <= SMALL_M or x.dtype == torch.float32:
        y = fp8_gemv(x.q, x.scale, weight, weight_scale, None, x.dtype)
    else:
        y = torch._scaled_mm(x.q, weight.t(), scale_a=x.scale, scale_b=weight_scale[None, :].float(),
                             out_dtype=torch.bfloat16).to(x.dtype)
    return y.view(*x.shape[:-1], weight.shape[0])


def input_quant(quant: QuantConfig | None, in_features: int) -> ActivationQuant | None:
    """How a linear layer of ``in_features`` inputs (per rank) under ``quant`` wants its input quantized (None:
    it takes the activation as is)."""
    if quant is None:
        return None
    return online_input_quant(in_features) if quant.weight_block is None else ActivationQuant(quant.weight_block[1])


def fp8_forward(layer: nn.Module, x: torch.Tensor | FP8Activation) -> torch.Tensor:
    """``x @ W^T`` (no bias) of a quantized layer, in x's dtype.  On CUDA the FP8 GEMMs; elsewhere the layer's
    dequantized weight (made once) times ``x`` rounded as those GEMMs round it.  ``x`` may arrive quantized as
    ``layer.input_quant`` asks (an ``FP8Activation``, from a kernel that fused the quantization)."""
    block = layer.quant.weight_block
    if not x.is_cuda:
        if isinstance(x, FP8Activation):
            x.check(layer.input_quant)
            x_rounded = x.dequantize()
        else:
            group = layer.input_quant.at(x.numel() // x.shape[-1]).group_size
            x_rounded = round_activations(x, group or x.shape[-1])
        return torch.nn.functional.linear(x_rounded, layer.dequantized_weight(torch.float32)).to(x.dtype)
    if block is None:
        return fp8_channel_linear(x, layer.weight, layer.weight_scale)
    return fp8_block_linear(x, layer.weight, layer.weight_scale_inv, None, block)


def finish_loading(layer: nn.Module, quant: QuantConfig | None) -> None:
    """After the checkpoint is in: quantize an online-FP8 layer's weight (replacing the parameter)."""
    if quant is None or quant.from_checkpoint or layer.weight.dtype == FP8_DTYPE:
        return
    w, scale = quantize_online(layer.weight.data)
    layer.weight = nn.Parameter(w, requires_grad=False)
    layer.register_buffer("weight_scale", scale)
