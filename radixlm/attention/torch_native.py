"""Attention in plain torch, computed in float32: the CPU backend and the reference for the Triton kernels.

Decode is batched: the KV of every request is gathered into a padded ``[bs, max_len]`` block with a length mask.
With ``page_size > 1`` the gather copies whole pages (``page_size`` consecutive slots) instead of single slots,
which on CPU is an order of magnitude faster than a row-per-token gather.  Extend runs one request at a time, so
its memory stays proportional to the longest request.  The arithmetic is torch's fused
``scaled_dot_product_attention`` in float32 (bf16 attention kernels on CPU are several times slower), with the
query heads of each KV head folded into extra query rows so K and V are never expanded per query head.  On CPU
``--kv-cache-dtype auto`` stores the cache in float32, so decode casts nothing but q.  An FP8 cache is gathered
as stored (through a uint8 view: one byte a value) and dequantized with the layer's scales in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from radixlm.attention.base import AttentionBackend

if TYPE_CHECKING:
    from radixlm.core import ForwardBatch
    from radixlm.layers.attention import RadixAttention


@dataclass
class _DecodeMetadata:
    # [bs, max_len / page_size] KV page of every (request, page of positions); padding points at page 0
    kv_pages: torch.Tensor
    key_pos: torch.Tensor  # [1, max_len] position of each key column (max_len is a multiple of page_size)
    valid: torch.Tensor  # [bs, max_len] key column holds a real token
    query_pos: torch.Tensor  # [bs, 1] position of the new token


@dataclass
class _ExtendMetadata:
    kv_slots: list[torch.Tensor]  # per request: [seq_len] KV slots of its whole sequence
    query_pos: list[torch.Tensor]  # per request: [extend_len] positions of its new tokens
    visible: list[torch.Tensor]  # per request: [extend_len, seq_len] bool, before any sliding window
    starts: list[int]  # per request: offset of its first new token in the batch


class TorchNativeAttnBackend(AttentionBackend):
    name = "torch_native"

    def __init__(self) -> None:
        self._meta: _DecodeMetadata | _ExtendMetadata | None = None

    def prepare(self, fb: "ForwardBatch") -> None:
        table = fb.req_to_token_pool.req_to_token
        if fb.is_decode:
            page = fb.kv_pool.page_size
            max_len = -(-max(fb.seq_lens_cpu) // page) * page
            key_pos = torch.arange(max_len, device=table.device)[None, :]
            valid = key_pos < fb.seq_lens[:, None]
            # A request's page p holds positions p*page .. p*page+page-1; its first slot names the page.
            pages = table[fb.req_pool_indices, :max_len:page].long() // page
            pages = pages.masked_fill(~valid[:, ::page], 0)
            self._meta = _DecodeMetadata(pages, key_pos, valid, (fb.seq_lens - 1)[:, None])
            return
        slots, qpos, visible, starts, start = [], [], [], [], 0
        masks = _split_masks(fb)
        for i, (row, prefix, ext) in enumerate(zip(fb.req_pool_indices.tolist(), fb.extend_prefix_lens_cpu,
                                                   fb.extend_seq_lens_cpu)):
            slots.append(table[row, : prefix + ext].long())
            positions = torch.arange(prefix, prefix + ext, device=table.device)
            key_pos = torch.arange(prefix + ext, device=table.device)
            if masks is None:
                seen = key_pos[None, :] <= positions[:, None]
            else:  # the whole prefix, and the new tokens the row's mask allows
                seen = torch.cat([torch.ones(ext, prefix, dtype=torch.bool, device=table.device), masks[i]], dim=1)
            qpos.append(positions)
            visible.append(seen)
            starts.append(start)
            start += ext
        self._meta = _ExtendMetadata(slots, qpos, visible, starts)

    def forward_extend(self, q: torch.Tensor, layer: "RadixAttention", fb: "ForwardBatch") -> torch.Tensor:
        meta = self._meta
        assert isinstance(meta, _ExtendMetadata)
        pool = fb.kv_pool
        k_buf, v_buf = pool.get_kv_buffer(layer.layer_id)
        out = q.new_empty((q.shape[0], q.shape[1], v_buf.shape[-1]))
        for slots, qpos, seen, start in zip(meta.kv_slots, meta.query_pos, meta.visible, meta.starts):
            n = qpos.numel()
            if layer.sliding_window is not None:
                key_pos = torch.arange(slots.numel(), device=q.device)
                seen = seen & (key_pos[None, :] > qpos[:, None] - layer.sliding_window)
            out[start : start + n] = _attend(
                q[start : start + n].unsqueeze(0), pool.read_rows(k_buf, slots, layer.layer_id, 0).unsqueeze(0),
                pool.read_rows(v_buf, slots, layer.layer_id, 1).unsqueeze(0), seen.unsqueeze(0), layer.scaling,
            )[0]
        return out

    def forward_decode(self, q: torch.Tensor, layer: "RadixAttention", fb: "ForwardBatch") -> torch.Tensor:
        meta = self._meta
        assert isinstance(meta, _DecodeMetadata)
        pool = fb.kv_pool
        k, v = (_gather_pages(buf, meta.kv_pages, pool.page_size) for buf in pool.get_kv_buffer(layer.layer_id))
        scales = pool.get_kv_scales(layer.layer_id)
        if scales is not None:  # gathered as uint8: one byte a value, dequantized here
            k, v = (x.view(pool.dtype).float() * scale for x, scale in zip((k, v), scales))
        allowed = meta.valid & _causal_window(meta.query_pos, meta.key_pos, layer.sliding_window)  # [bs, max_len]
        return _attend(q.unsqueeze(1), k, v, allowed.unsqueeze(1), layer.scaling)[:, 0]


def _split_masks(fb: "ForwardBatch") -> list[torch.Tensor] | None:
    """TARGET_VERIFY: each request's [k, k] mask over its new tokens, from the flat batch mask."""
    if fb.custom_mask is None:
        return None
    out, offset = [], 0
    for ext in fb.extend_seq_lens_cpu:
        out.append(fb.custom_mask[offset : offset + ext * ext].view(ext, ext))
        offset += ext * ext
    return out


def _gather_pages(buf: torch.Tensor, pages: torch.Tensor, page_size: int) -> torch.Tensor:
    """``buf`` [num_slots, num_kv_heads, head_dim] read at ``pages`` [bs, n] -> [bs, n * page_size, kv_heads, hd]
    (an FP8 buffer comes back as its uint8 bytes)."""
    if buf.element_size() == 1:
        buf = buf.view(torch.uint8)  # index_select does not take float8 everywhere
    bs, n = pages.shape
    if not buf.is_contiguous():  # a V view into an MLA latent buffer: gather rows, then drop the key columns
        return buf[(pages[:, :, None] * page_size + torch.arange(page_size, device=buf.device)).reshape(bs, -1)]
    by_page = buf.view(-1, page_size * buf.shape[1] * buf.shape[2])  # [num_pages, page_size * kv_heads * hd]
    return by_page.index_select(0, pages.reshape(-1)).view(bs, n * page_size, *buf.shape[1:])


def _causal_window(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    allowed = key_pos <= query_pos
    if window is not None:
        allowed &= key_pos > query_pos - window
    return allowed


def _attend(
    q: torch.Tensor,  # [b, n, num_heads, head_dim]
    k: torch.Tensor,  # [b, s, num_kv_heads, head_dim]
    v: torch.Tensor,  # [b, s, num_kv_heads, v_head_dim]
    allowed: torch.Tensor,  # [b, n, s] bool; every query row allows at least one key
    scaling: float,
) -> torch.Tensor:  # [b, n, num_heads, v_head_dim]
    b, n, num_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = num_heads // kv_heads
    # The query heads of one KV head become extra query rows of that head, (token, head) ordered, so the kernel
    # runs one [n * group, s] problem per KV head instead of expanding K and V to every query head.
    rows = q.float().view(b, n, kv_heads, group, head_dim).permute(0, 2, 1, 3, 4).reshape(b, kv_heads, n * group, -1)
    mask = allowed.repeat_interleave(group, dim=1) if group > 1 and n > 1 else allowed  # [b, n * group | 1, s]
    out = F.scaled_dot_product_attention(
        rows, k.float().transpose(1, 2), v.float().transpose(1, 2), attn_mask=mask.unsqueeze(1), scale=scaling,
    )  # [b, kv_heads, n * group, head_dim]
    v_dim = v.shape[-1]
    return out.view(b, kv_heads, n, group, v_dim).permute(0, 2, 1, 3, 4).reshape(b, n, num_heads, -1).to(q.dtype)
