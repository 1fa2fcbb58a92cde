"""FP8 (E4M3) weights of the linear layers (``radixlm.layers.linear``), in the two forms of ``QuantConfig``:

- block-wise from the checkpoint: ``weight`` float8_e4m3fn [out, in] and ``weight_scale_inv`` float32
  [ceil(out / bn), ceil(in / bk)]; ``W = weight * weight_scale_inv[row // bn, col // bk]``.  Tensor parallelism
  shards whole blocks: a rank's slice must start and end on block boundaries, else loading refuses the TP size.
- online: weights loaded in the model dtype, then (``quantize_online``) ``weight`` float8_e4m3fn with
  ``weight_scale`` float32 [out], one scale per output channel (``max |row| / 448``).

Activations are quantized per token per group of ``bk`` channels for block weights; for online FP8 per token,
except at decode-sized M (``SMALL_M`` rows, the GEMV's), where they stay unquantized (``input_quant``): the GEMV
streams the weight and would gain nothing from FP8 activations, and unrounded they are closer to the model's
(W8A16, as FP8 "Marlin" kernels run on GPUs without FP8 MMAs).  On CUDA a Triton kernel quantizes them, either the
layer's own quantizer or, fused, the norm or SiLU-mul kernel that produced them (which hands the layer an
``FP8Activation``); then at decode-sized M a Triton GEMV streams the weight (``radixlm.kernels.fp8_gemv``; for
online FP8 it computes the norm or SiLU-mul before it too: ``deferred_input``) and above it the FP8 GEMMs run
(``radixlm.kernels.fp8``: the Triton block-scaled GEMM; cuBLAS's row-wise scaled ``_scaled_mm`` for per-channel
weights).  Elsewhere the same rounding in torch over the dequantized weight, so CPU results show the
quantization error the GPU has.
"""

from __future__ import annotations

import torch
from torch import nn

from radixlm.config.quant_config import QuantConfig
from radixlm.kernels.fp8 import FP8_DTYPE, FP8_MAX, dequantize_block_fp8, fp8_block_linear, round_activations
from radixlm.kernels.deferred_input import DeferredInput, NormedInput, SiluMulInput
from radixlm.kernels.fp8_activation import ActivationQuant, FP8Activation, quantize_activation

# An online-FP8 linear's input quantization: per token (cuBLAS's row-wise GEMM), none at the GEMV's M.
ONLINE_INPUT_QUANT = ActivationQuant(None, small_m_unquantized=True)


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
    x: torch.Tensor | FP8Activation | DeferredInput, weight: torch.Tensor, weight_scale: torch.Tensor
) -> torch.Tensor:
    """``x`` [*, K] times an online-FP8 ``weight`` [N, K] (float8_e4m3fn, per-channel ``weight_scale`` [N]) with
    ``x`` as ``ONLINE_INPUT_QUANT`` says, on CUDA (``fp8_forward`` rounds in torch elsewhere).  Decode-sized M:
    the W8A16 GEMV, which takes a deferred norm or SiLU-mul too.  Above: ``x`` quantized per token (an
    ``FP8Activation`` arrives quantized), then cuBLAS's row-wise scaled FP8 GEMM, or for float32 models (that GEMM
    writes only bf16) the Triton GEMV."""
    from radixlm.kernels.fp8_gemv import fp8_gemv, fp8_gemv_w8a16

    rows = _rows(x.shape)
    if ONLINE_INPUT_QUANT.at(rows) is None:
        if isinstance(x, FP8Activation):
            x.check(ONLINE_INPUT_QUANT)  # raises: these rows are taken unquantized
        y = fp8_gemv_w8a16(x.reshape(rows, x.shape[-1]) if isinstance(x, torch.Tensor) else x, weight, weight_scale)
        return y.view(*x.shape[:-1], weight.shape[0])
    if isinstance(x, FP8Activation):
        x.check(ONLINE_INPUT_QUANT)
    else:
        x = quantize_activation(_materialized(x), ONLINE_INPUT_QUANT)  # [M, K] fp8, [M, 1]
    if x.dtype == torch.float32:
        y = fp8_gemv(x.q, x.scale, weight, weight_scale, None, x.dtype)
    else:
        y = torch._scaled_mm(x.q, weight.t(), scale_a=x.scale, scale_b=weight_scale[None, :].float(),
                             out_dtype=torch.bfloat16).to(x.dtype)
    return y.view(*x.shape[:-1], weight.shape[0])


def _rows(shape: torch.Size) -> int:
    rows = 1
    for size in shape[:-1]:
        rows *= size
    return rows


def _materialized(x: torch.Tensor | DeferredInput) -> torch.Tensor:
    return x.materialize() if isinstance(x, (NormedInput, SiluMulInput)) else x


def input_quant(quant: QuantConfig | None, in_features: int) -> ActivationQuant | None:
    """How a linear layer of ``in_features`` inputs (per rank) under ``quant`` wants its input quantized (None:
    it takes the activation as is)."""
    if quant is None:
        return None
    return ONLINE_INPUT_QUANT if quant.weight_block is None else ActivationQuant(quant.weight_block[1])


def fp8_forward(layer: nn.Module, x: torch.Tensor | FP8Activation | DeferredInput) -> torch.Tensor:
    """``x @ W^T`` (no bias) of a quantized layer, in x's dtype.  On CUDA the FP8 GEMMs; elsewhere the layer's
    dequantized weight (made once) times ``x`` rounded as those GEMMs round it.  ``x`` may arrive quantized as
    ``layer.input_quant`` asks (an ``FP8Activation``, from a kernel that fused the quantization), or, where that
    says unquantized, deferred (``deferred_input``: online FP8's decode GEMV computes it)."""
    block = layer.quant.weight_block
    if not x.is_cuda:
        if isinstance(x, FP8Activation):
            x.check(layer.input_quant)
            x_rounded = x.dequantize()
        else:
            x = _materialized(x)
            quant = layer.input_quant.at(_rows(x.shape))
            x_rounded = x.float() if quant is None else round_activations(x, quant.group_size or x.shape[-1])
        return torch.nn.functional.linear(x_rounded, layer.dequantized_weight(torch.float32)).to(x.dtype)
    if block is None:
        return fp8_channel_linear(x, layer.weight, layer.weight_scale)
    return fp8_block_linear(_materialized(x), layer.weight, layer.weight_scale_inv, None, block)


def finish_loading(layer: nn.Module, quant: QuantConfig | None) -> None:
    """After the checkpoint is in: quantize an online-FP8 layer's weight (replacing the parameter)."""
    if quant is None or quant.from_checkpoint or layer.weight.dtype == FP8_DTYPE:
        return
    w, scale = quantize_online(layer.weight.data)
    layer.weight = nn.Parameter(w, requires_grad=False)
    layer.register_buffer("weight_scale", scale)
