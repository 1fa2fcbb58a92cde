"""Attention through the engine's C kernels (``radixlm.kernels.cpu``): the CPU backend.

Decode reads every request's K/V pages in place (no padded gather, no float32 copy of a bf16 cache), so on CPU
``--kv-cache-dtype auto`` keeps the cache in the model dtype.  Extend is the torch-native code (prefill is bound by
the GEMMs, not by attention).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from radixlm.attention.torch_native import TorchNativeAttnBackend
from radixlm.kernels import cpu

if TYPE_CHECKING:
    from radixlm.core import ForwardBatch
    from radixlm.layers.attention import RadixAttention


class CpuAttnBackend(TorchNativeAttnBackend):
    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.kernel_head_dim = head_dim % cpu.HEAD_DIM_MULTIPLE == 0

    def init_forward_metadata(self, fb: "ForwardBatch") -> None:
        if fb.is_decode and self.kernel_head_dim and cpu.supports(fb.token_to_kv_pool.get_kv_buffer(0)[0]):
            self._meta = None  # decode reads the batch's own table, rows and lengths
            return
        # Extend, or what the decode kernel lacks (a float16 cache, an odd head dim): the torch code.
        super().init_forward_metadata(fb)

    def forward_decode(self, q: torch.Tensor, layer: "RadixAttention", fb: "ForwardBatch") -> torch.Tensor:
        if self._meta is not None:
            return super().forward_decode(q, layer, fb)
        k_buf, v_buf = fb.token_to_kv_pool.get_kv_buffer(layer.layer_id)
        return cpu.decode_attention(
            q, k_buf, v_buf, fb.req_to_token_pool.req_to_token, fb.req_pool_indices, fb.seq_lens, layer.scaling,
            layer.sliding_window,
        )
