"""The shared vocabulary of the engine: what a forward pass is asked to do.

``ForwardBatch`` is the device-side description of one model step: which tokens go in, at which positions,
whose KV cache they extend and where their new K/V are stored.  Everything the model and the attention backend
need arrives through it, explicitly, as an argument.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum, auto
from typing import TYPE_CHECKING, Any

import torch

from radixlm.sampling import SamplingParams

if TYPE_CHECKING:
    from radixlm.attention.base import AttentionBackend
    from radixlm.sampling.logprobs import RequestLogprobs
    from radixlm.mem import MHATokenToKVPool, ReqToTokenPool
    from radixlm.sampling import SamplingBatchInfo

__all__ = ["ForwardBatch", "ForwardMode", "Req", "SamplingParams"]


def _empty_slots() -> torch.Tensor:
    return torch.empty(0, dtype=torch.int64)


@dataclass(eq=False)
class Req:
    """One request inside the scheduler: its tokens, where its KV lives, and how far it has got.

    KV bookkeeping: the request's row ``req_pool_idx`` of ``req_to_token`` maps positions ``0 .. kv_len - 1``
    of ``origin_input_ids + output_ids`` to KV slots.  The first ``len(prefix_indices)`` of those slots belong
    to the radix cache (shared, locked through ``last_node``); the rest are owned by this request until it is
    cached or freed.
    """

    rid: str
    origin_input_ids: list[int]
    sampling_params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    req_pool_idx: int | None = None
    prefix_indices: torch.Tensor = field(default_factory=_empty_slots)  # [prefix_len] int64 KV slots
    last_node: Any = None  # radix-tree node at the end of the locked prefix
    kv_len: int = 0  # tokens of origin_input_ids + output_ids whose KV is stored
    seed: int = 0
    logprobs: "RequestLogprobs | None" = None  # set when the request asked for logprobs
    grammar: Any = None  # xgrammar.GrammarMatcher of a constrained request, advanced with every output token
    eos_token_ids: frozenset[int] = frozenset()
    max_context_len: int = 1 << 31  # prompt + output may not exceed this
    # Progress
    extend_len: int = 0  # new tokens this request contributes to the current EXTEND batch
    cached_tokens: int = 0  # prompt tokens served from the radix cache at first admission
    num_retractions: int = 0
    finished_reason: dict[str, Any] | None = None  # {"type": "stop"|"length"|"abort", ...}
    created_time: float = 0.0
    queue_time: float | None = None  # seconds from arrival to first admission
    grammar_time: float | None = None  # seconds its grammar took to compile (constrained requests)

    def all_ids(self) -> list[int]:
        return self.origin_input_ids + self.output_ids

    @property
    def finished(self) -> bool:
        return self.finished_reason is not None

    @property
    def seq_len(self) -> int:
        return len(self.origin_input_ids) + len(self.output_ids)

    def check_finished(self) -> None:
        """Set ``finished_reason`` after a new output token, by SGLang's rules (EOS and stop ids end the request
        only once ``min_new_tokens`` are out; EOS is ignored with ``ignore_eos``)."""
        if self.finished:
            return
        p = self.sampling_params
        last = self.output_ids[-1]
        n = len(self.output_ids)
        if n >= p.min_new_tokens:
            if last in (p.stop_token_ids or ()):
                self.finished_reason = {"type": "stop", "matched": last}
                return
            if not p.ignore_eos and last in self.eos_token_ids:
                self.finished_reason = {"type": "stop", "matched": last}
                return
        if p.max_new_tokens is not None and n >= p.max_new_tokens:
            self.finished_reason = {"type": "length", "length": n}
        elif self.seq_len >= self.max_context_len:
            self.finished_reason = {"type": "length", "length": n}

    def reset_for_retraction(self) -> None:
        """Forget all KV bookkeeping; the request will be prefilled again (prompt + outputs so far)."""
        self.req_pool_idx = None
        self.prefix_indices = _empty_slots()
        self.last_node = None
        self.kv_len = 0
        self.extend_len = 0
        self.num_retractions += 1


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
