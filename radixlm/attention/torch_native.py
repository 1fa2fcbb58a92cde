"""Attention in plain torch, exact in float32: the CPU backend and the reference for the Triton kernels.

Decode is batched (the KV of every request gathered into a padded ``[bs, max_len]`` block with a length mask);
extend runs one request at a time, so its memory stays proportional to the longest request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from radixlm.attention.base import AttentionBackend

if TYPE_CHECKING:
    from radixlm.core import ForwardBatch
    from radixlm.layers.attention import RadixAttention


@dataclass
class _DecodeMetadata:
    kv_slots: torch.Tensor  # [bs, max_len] KV slot of every (request, position); padding points at slot 0
    key_pos: torch.Tensor  # [1, max_len] position of each key column
    valid: torch.Tensor  # [bs, max_len] key column holds a real token
    query_pos: torch.Tensor  # [bs, 1] position of the new token


@dataclass
class _ExtendMetadata:
    kv_slots: list[torch.Tensor]  # per request: [seq_len] KV slots of its whole sequence
    query_pos: list[torch.Tensor]  # per request: [extend_len] positions of its new tokens
    starts: list[int]  # per request: offset of its first new token in the batch


class TorchNativeAttnBackend(AttentionBackend):
    def __init__(self) -> None:
        self._meta: _DecodeMetadata | _ExtendMetadata | None = None

    def init_forward_metadata(self, fb: "ForwardBatch") -> None:
        table = fb.req_to_token_pool.req_to_token
        if fb.is_decode:
            max_len = max(fb.seq_lens_cpu)
            key_pos = torch.arange(max_len, device=table.device)[None, :]
            valid = key_pos < fb.seq_lens[:, None]
            slots = table[fb.req_pool_indices, :max_len].long().masked_fill(~valid, 0)
            self._meta = _DecodeMetadata(slots, key_pos, valid, (fb.seq_lens - 1)[:, None])
            return
        slots, qpos, starts, start = [], [], [], 0
        for row, prefix, ext in zip(fb.req_pool_indices.tolist(), fb.extend_prefix_lens_cpu, fb.extend_seq_lens_cpu):
            slots.append(table[row, : prefix + ext].long())
            qpos.append(torch.arange(prefix, prefix + ext, device=table.device))
            starts.append(start)
            start += ext
        self._meta = _ExtendMetadata(slots, qpos, starts)

    def forward_extend(self, q: torch.Tensor, layer: "RadixAttention", fb: "ForwardBatch") -> torch.Tensor:
        meta = self._meta
        assert isinstance(meta, _ExtendMetadata)
        k_buf, v_buf = fb.token_to_kv_pool.get_kv_buffer(layer.layer_id)
        out = torch.empty_like(q)
        for slots, qpos, start in zip(meta.kv_slots, meta.query_pos, meta.starts):
            n = qpos.numel()
            key_pos = torch.arange(slots.numel(), device=q.device)
            allowed = _causal_window(qpos[:, None], key_pos[None, :], layer.sliding_window)  # [n, seq_len]
            out[start : start + n] = _attend(
                q[start : start + n].unsqueeze(0), k_buf[slots].unsqueeze(0), v_buf[slots].unsqueeze(0),
                allowed.unsqueeze(0), layer.scaling,
            )[0]
        return out

    def forward_decode(self, q: torch.Tensor, layer: "RadixAttention", fb: "ForwardBatch") -> torch.Tensor:
        meta = self._meta
        assert isinstance(meta, _DecodeMetadata)
        k_buf, v_buf = fb.token_to_kv_pool.get_kv_buffer(layer.layer_id)
        allowed = meta.valid & _causal_window(meta.query_pos, meta.key_pos, layer.sliding_window)  # [bs, max_len]
        out = _attend(q.unsqueeze(1), k_buf[meta.kv_slots], v_buf[meta.kv_slots], allowed.unsqueeze(1), layer.scaling)
        return out[:, 0]


def _causal_window(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    allowed = key_pos <= query_pos
    if window is not None:
        allowed &= key_pos > query_pos - window
    return allowed


def _attend(
    q: torch.Tensor,  # [b, n, num_heads, head_dim]
    k: torch.Tensor,  # [b, s, num_kv_heads, head_dim]
    v: torch.Tensor,  # [b, s, num_kv_heads, head_dim]
    allowed: torch.Tensor,  # [b, n, s] bool
    scaling: float,
) -> torch.Tensor:  # [b, n, num_heads, head_dim]
    b, n, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_heads // num_kv_heads
    # Query heads of one KV head side by side: [b, num_kv_heads, group * n, head_dim]
    qg = q.view(b, n, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4).reshape(b, num_kv_heads, group * n, head_dim)
    scores = torch.matmul(qg.float(), k.permute(0, 2, 3, 1).float()) * scaling  # [b, kv_heads, group * n, s]
    mask = allowed.unsqueeze(1).repeat(1, 1, group, 1).view(b, 1, group * n, -1)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    out = torch.matmul(probs, v.permute(0, 2, 1, 3).float())  # [b, kv_heads, group * n, head_dim]
    out = out.view(b, num_kv_heads, group, n, head_dim).permute(0, 3, 1, 2, 4).reshape(b, n, num_heads, head_dim)
    return out.to(q.dtype)
