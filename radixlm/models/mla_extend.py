"""DeepSeek MLA extend in the decompressed form, and the rule choosing it over the absorbed form.

Absorbed attention (``deepseek_v2``'s module docstring) scores every (query, key) pair over the 576-wide latent
(512 + 64 rope) and sums 512-wide latent values: 1088 multiply-adds per pair and head.  Decompressed, each key is
rebuilt per head, ``k = [W_UK c ; k_pe]`` (192 wide) and ``v = W_UV c`` (128 wide), and attention is ordinary
causal MHA: 320 per pair and head, 3.4x fewer, at the price of running ``kv_b_proj`` over every key of the
batch, the cached prefix's included (512 x 256 per key and head), while the absorbed form runs ``W_UK`` and
``W_UV`` over every query (the same 512 x 256 per query and head).  Long extends over short prefixes win; a
few new tokens after a long cached prefix lose (the prefix is decompressed for them alone).

The cache format does not change: the new tokens' latents go into the MLA pool as in the absorbed form, then the
whole sequence of every request (prefix and new tokens) is gathered from the pool, decompressed into temporary
contiguous K/V, and attended with the request's causal offset.  The Triton backend runs the extend kernel over
that contiguous layout (a table mapping position p of request i to row ``start_i + p``); the others run torch's
SDPA per request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from radixlm.core import ForwardMode

if TYPE_CHECKING:
    from radixlm.core import ForwardBatch

EXTEND_PATHS = ("auto", "absorbed", "decompressed")
# "auto" takes the decompressed form for an EXTEND batch when the multiply-adds it saves over the layer's heads
# (``mla_extend_macs``, times the rank's query heads) reach this.  Set from bench/gpu/mla.py's extend table on the
# H200 (docs/benchmarks.md, GPU run F): the absorbed form won every measured point that saves <= 6.4 G (V2-Lite, 16
# heads: 1024 new tokens without prefix, 0.81x; 256 after a 4096 prefix, 0.78x; V3, 128 heads: 256 new tokens,
# 0.71x), the decompressed form every point that saves >= 37 G (V3: 256 after 4096, 1.58x; 1024 new, 1.52x;
# V2-Lite: 1024 after 4096, 1.58x; 4096 new, 2.05x).  Below a few G both forms are bound by launches and the
# up-projections, which the model does not weigh; 16 G sits between the two sets.
DECOMPRESSED_MIN_MACS_SAVED = 16e9


@dataclass(frozen=True)
class MLADims:
    kv_lora_rank: int  # c
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


def mla_extend_macs(prefix_lens: list[int], extend_lens: list[int], d: MLADims) -> tuple[int, int]:
    """(absorbed, decompressed) multiply-adds per head of one layer's attention over a batch: the (query, key)
    pairs of causal attention after each prefix, and the up-projections each form needs (absorbed: ``W_UK`` into
    every query, ``W_UV`` out of every output; decompressed: ``kv_b_proj`` over every key)."""
    pairs = sum(n * p + n * (n + 1) // 2 for p, n in zip(prefix_lens, extend_lens))
    up = d.kv_lora_rank * (d.qk_nope_head_dim + d.v_head_dim)
    latent = d.kv_lora_rank + d.qk_rope_head_dim
    absorbed = pairs * (latent + d.kv_lora_rank) + sum(extend_lens) * up
    decompressed = (pairs * (d.qk_nope_head_dim + d.qk_rope_head_dim + d.v_head_dim)
                    + sum(p + n for p, n in zip(prefix_lens, extend_lens)) * up)
    return absorbed, decompressed


def use_decompressed(fb: "ForwardBatch", path: str, dims: MLADims, num_heads: int) -> bool:
    """Whether a layer with extend path ``path`` (``EXTEND_PATHS``) and ``num_heads`` query heads on this rank runs
    ``fb`` decompressed.  Only EXTEND batches can: DECODE (one query per request: decompressing its whole context
    would dwarf the attention) and MIXED / TARGET_VERIFY (mostly short rows; a verification mask) stay absorbed.
    ``auto``: when the modelled saving reaches ``DECOMPRESSED_MIN_MACS_SAVED``; host metadata only."""
    if fb.forward_mode is not ForwardMode.EXTEND or fb.custom_mask is not None or path == "absorbed":
        return False
    if path == "decompressed":
        return True
    absorbed, decompressed = mla_extend_macs(fb.extend_prefix_lens_cpu, fb.extend_seq_lens_cpu, dims)
    return (absorbed - decompressed) * num_heads >= DECOMPRESSED_MIN_MACS_SAVED


@dataclass
class SequenceRows:
    """Every request's whole sequence (cached prefix, then new tokens) laid out contiguously, request after
    request: position p of request i is row ``starts[i] + p``."""

    slots: torch.Tensor  # [total] int64: the pool slot of each row
    table: torch.Tensor  # [bs, max_len] int32: row of position p of request i (past its length: unused)
    starts: list[int]  # [bs] first row of each request
    lens: list[int]  # [bs] prefix + new tokens


def sequence_rows(fb: "ForwardBatch") -> SequenceRows:
    """The rows of ``fb``'s sequences in the KV pool: device work only, sized from the host lengths (no host
    tensor is copied to the device)."""
    lens = [p + n for p, n in zip(fb.extend_prefix_lens_cpu, fb.extend_seq_lens_cpu)]
    starts = [0]
    for n in lens[:-1]:
        starts.append(starts[-1] + n)
    device = fb.req_pool_indices.device
    seq_lens = fb.extend_prefix_lens + fb.extend_seq_lens  # [bs]
    start_t = torch.cumsum(seq_lens, 0) - seq_lens  # [bs], the device copy of ``starts``
    total = sum(lens)
    req = torch.repeat_interleave(torch.arange(len(lens), device=device), seq_lens, output_size=total)  # [total]
    pos = torch.arange(total, device=device) - start_t[req]
    slots = fb.req_to_token_pool.req_to_token[fb.req_pool_indices[req], pos].long()
    table = (start_t[:, None] + torch.arange(max(lens), device=device)[None, :]).to(torch.int32)
    return SequenceRows(slots, table, starts, lens)


def prefix_causal_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, Dk]: the batch's new tokens, ragged by request
    k: torch.Tensor,  # [total, num_heads, Dk]: rows of ``seqs``
    v: torch.Tensor,  # [total, num_heads, Dv]
    seqs: SequenceRows,
    fb: "ForwardBatch",
    scaling: float,
    use_triton: bool,
) -> torch.Tensor:  # [num_tokens, num_heads, Dv]
    """New token j of request i (position ``prefix_i + j``) attends to rows ``starts[i] .. starts[i] + prefix_i
    + j`` of K/V."""
    o = q.new_empty((q.shape[0], q.shape[1], v.shape[-1]))
    if use_triton:
        from radixlm.kernels.extend_attention import extend_attention_fwd  # keeps CPU-only use free of triton

        rows = torch.arange(len(seqs.lens), device=q.device)
        extend_attention_fwd(q, k, v, o, seqs.table, rows, fb.extend_prefix_lens, fb.extend_seq_lens,
                             fb.extend_start_loc, max(fb.extend_seq_lens_cpu), scaling)
        return o
    token = 0
    for start, length, n in zip(seqs.starts, seqs.lens, fb.extend_seq_lens_cpu):
        prefix = length - n
        allowed = (torch.arange(length, device=q.device)[None, :]
                   <= torch.arange(prefix, length, device=q.device)[:, None])  # [n, length]
        out = F.scaled_dot_product_attention(
            q[token : token + n].float().transpose(0, 1), k[start : start + length].float().transpose(0, 1),
            v[start : start + length].float().transpose(0, 1), attn_mask=allowed, scale=scaling,
        )  # [num_heads, n, Dv]
        o[token : token + n] = out.transpose(0, 1).to(o.dtype)
        token += n
    return o
