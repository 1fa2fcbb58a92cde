"""The shared vocabulary of the engine: what a forward pass is asked to do.

``ForwardBatch`` is the device-side description of one model step: which tokens go in, at which positions,
whose KV cache they extend and where their new K/V are stored.  Everything the model and the attention backend
need arrives through it, explicitly, as an argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, auto
from typing import TYPE_CHECKING

import torch

from radixlm.sampling import SamplingParams

if TYPE_CHECKING:
    from radixlm.attention.base import AttentionBackend
    from radixlm.mem import MHATokenToKVPool, ReqToTokenPool
    from radixlm.sampling import SamplingBatchInfo

__all__ = ["ForwardBatch", "ForwardMode", "SamplingParams"]


class ForwardMode(IntEnum):
    EXTEND = auto()  # new tokens of each request (a prompt or a chunk of it), after an optional cached prefix
    DECODE = auto()  # exactly one new token per request


@dataclass
class ForwardBatch:
    """One model step over a batch of requests.

    Token-major tensors are ragged: the new tokens of request 0, then of request 1, ...
    For DECODE, ``extend_*`` fields are None and every request contributes one token.
    """

    forward_mode: ForwardMode
    batch_size: int
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64, position of each new token in its request
    req_pool_indices: torch.Tensor  # [bs] int64, row of each request in req_to_token
    seq_lens: torch.Tensor  # [bs] int64, tokens in KV after this step (prefix + new)
    seq_lens_cpu: list[int]
    out_cache_loc: torch.Tensor  # [num_tokens] int64, KV slot where each new token's K/V is stored
    req_to_token_pool: "ReqToTokenPool"
    token_to_kv_pool: "MHATokenToKVPool"
    attn_backend: "AttentionBackend"
    # EXTEND only
    extend_prefix_lens: torch.Tensor | None = None  # [bs] int64, cached tokens before the new ones
    extend_seq_lens: torch.Tensor | None = None  # [bs] int64, new tokens per request
    extend_start_loc: torch.Tensor | None = None  # [bs] int64, offset of each request's first new token
    extend_prefix_lens_cpu: list[int] | None = None
    extend_seq_lens_cpu: list[int] | None = None
    # Per request, index (within its new tokens) from which logits of every token are returned as well as the
    # last token's; None returns only last-token logits.  Prompt logprobs are computed from these.
    extend_logits_start_cpu: list[int] | None = None
    sampling_info: "SamplingBatchInfo | None" = None

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def is_decode(self) -> bool:
        return self.forward_mode == ForwardMode.DECODE

    @property
    def is_extend(self) -> bool:
        return self.forward_mode == ForwardMode.EXTEND
