"""Attention through the engine's C kernels (``radixlm.kernels.cpu``): the CPU backend.

Both modes read each request's K/V rows in place through ``req_to_token`` (no padded gather, no float32 copy of a
bf16 cache), so on CPU ``--kv-cache-dtype auto`` keeps the cache in the model dtype.  EXTEND, MIXED and DECODE
run in C; what the kernels lack runs the torch-native code: TARGET_VERIFY (a custom mask over the new tokens),
K and V of different widths (an MLA latent cache), a float16 or FP8 cache, a head dim off the 16-float vector
width.  An FP8 cache (``--kv-cache-dtype fp8_*``) therefore runs all of its attention in the torch-native code,
which dequantizes what it gathers; the backend logs that once.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from radixlm.attention.torch_native import TorchNativeAttnBackend
from radixlm.core import ForwardMode
from radixlm.kernels import cpu

if TYPE_CHECKING:
    from radixlm.core import ForwardBatch
    from radixlm.layers.attention import RadixAttention

logger = logging.getLogger(__name__)


class CpuAttnBackend(TorchNativeAttnBackend):
    name = "cpu"

    def __init__(self, head_dim: int, v_head_dim: int, quantized_kv: bool = False) -> None:
        super().__init__()
        self.kernel_shapes = head_dim == v_head_dim and head_dim % cpu.HEAD_DIM_MULTIPLE == 0 and not quantized_kv
        if quantized_kv:
            logger.info("FP8 KV cache: the C attention kernels read float32/bfloat16 caches only, so attention "
                        "runs the torch-native code (gather, dequantize with the layer's scales, float32 SDPA)")
        self._in_place = False  # this batch runs the C kernels
        self._plan: cpu.ExtendPlan | None = None

    def prepare(self, fb: "ForwardBatch") -> None:
        self._in_place = (self.kernel_shapes and fb.forward_mode is not ForwardMode.TARGET_VERIFY
                          and cpu.supports(fb.kv_pool.get_kv_buffer(0)[0]))
        if not self._in_place:
            super().prepare(fb)
        elif not fb.is_decode:  # decode reads the batch's own table, rows and lengths
            self._plan = cpu.ExtendPlan.build(fb.req_pool_indices, fb.extend_prefix_lens_cpu, fb.extend_seq_lens_cpu)

    def forward_extend(self, q: torch.Tensor, layer: "RadixAttention", fb: "ForwardBatch") -> torch.Tensor:
        if not self._in_place:
            return super().forward_extend(q, layer, fb)
        assert self._plan is not None
        k_buf, v_buf = fb.kv_pool.get_kv_buffer(layer.layer_id)
        return cpu.extend_attention(q, k_buf, v_buf, fb.req_to_token_pool.req_to_token, self._plan, layer.scaling,
                                    layer.sliding_window)

    def forward_decode(self, q: torch.Tensor, layer: "RadixAttention", fb: "ForwardBatch") -> torch.Tensor:
        if not self._in_place:
            return super().forward_decode(q, layer, fb)
        k_buf, v_buf = fb.kv_pool.get_kv_buffer(layer.layer_id)
        return cpu.decode_attention(
            q, k_buf, v_buf, fb.req_to_token_pool.req_to_token, fb.req_pool_indices, fb.seq_lens, layer.scaling,
            layer.sliding_window,
        )
