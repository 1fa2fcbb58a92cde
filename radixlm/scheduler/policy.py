"""Admission policy: the order of the waiting queue and the token budget of one prefill batch."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from radixlm.core import Req

if TYPE_CHECKING:
    from radixlm.cache import RadixCache

# Future decode tokens reserved per request are capped: a request asking for 32k new tokens rarely uses them.
CLIP_MAX_NEW_TOKENS = 4096
# Longest-prefix-match costs one tree walk per waiting request; past this queue length fall back to FCFS.
LPM_MAX_QUEUE = 128


def cache_match_key(req: Req) -> list[int]:
    """Tokens of ``req`` to look up in the radix cache: all but the last (>= 1 token must run to get logits), none
    past ``cacheable_len`` (prompt positions given as embeddings), and none from the first prompt position whose
    logprob is still to be computed (cached tokens produce no logits)."""
    key = req.all_ids()[: min(req.seq_len - 1, req.cacheable_len)]  # looked up in the req.lora_name namespace
    lp = req.logprobs
    if lp is not None and not lp.input_done:
        start = lp.options.input_start(len(req.origin_input_ids))
        key = key[: max(start - 1, 0)]
    return key


def order_waiting_queue(waiting: list[Req], policy: str, tree_cache: "RadixCache") -> list[Req]:
    """``fcfs``: arrival order.  ``lpm``: longest cached prefix first (ties keep arrival order)."""
    if policy == "fcfs" or len(waiting) > LPM_MAX_QUEUE or tree_cache.disable:
        return waiting
    matched = {id(r): len(tree_cache.match_prefix(cache_match_key(r), r.lora_name).device_indices) for r in waiting}
    return sorted(waiting, key=lambda r: -matched[id(r)])


def reserved_decode_tokens(req: Req, new_token_ratio: float) -> int:
    """KV tokens to keep free for ``req``'s future decode steps: no more than it can still generate, which its
    ``max_context_len`` (at most the pool) bounds too.  So a request alone always fits an otherwise empty pool,
    even at ``new_token_ratio`` 1.0 after a retraction (which only decode steps decay)."""
    p = req.sampling_params
    remaining = (p.max_new_tokens if p.max_new_tokens is not None else CLIP_MAX_NEW_TOKENS) - len(req.output_ids)
    remaining = min(remaining, CLIP_MAX_NEW_TOKENS, req.max_context_len - req.seq_len)
    return int(max(0, remaining) * new_token_ratio)


class AdapterSlots:
    """The distinct LoRA adapters named by one batch's requests, at most ``limit`` (``--max-loras-per-batch``,
    the adapter pool's device slots).  None, the base model, takes no slot."""

    def __init__(self, limit: int, names: Iterable[str | None]) -> None:
        self.limit = limit
        self.names = {n for n in names if n is not None}

    def fits(self, name: str | None) -> bool:
        return name is None or name in self.names or len(self.names) < self.limit

    def add(self, name: str | None) -> None:
        if not self.fits(name):
            raise RuntimeError(f"scheduler bug: adapter {name!r} admitted past {self.limit} adapters per batch")
        if name is not None:
            self.names.add(name)


@dataclass
class PrefillBudget:
    """What one prefill batch may still take: KV tokens (free + evictable − decode reserve), input tokens, and
    the chunk size for a prompt that does not fit whole.  ``page_slack`` (page size − 1) is charged per request
    on top of its tokens: its new tokens may start a page they only partly fill."""

    rem_total_tokens: int
    rem_input_tokens: int
    chunk_size: int | None  # None: no chunking
    page_slack: int = 0
    admitted: list[Req] = field(default_factory=list)

    def can_take(self) -> bool:
        return self.rem_input_tokens > 0 and self.rem_total_tokens > self.page_slack

    def plan(self, input_len: int, reserve: int) -> int | None:
        """Tokens of a prompt with ``input_len`` uncached tokens to prefill now (all of them, or a chunk), or None
        when it must wait for memory."""
        limit = self.rem_input_tokens if self.chunk_size is None else min(self.rem_input_tokens, self.chunk_size)
        memory = self.rem_total_tokens - self.page_slack
        # Without chunking, a prompt over the input budget runs alone rather than never.
        if input_len <= limit or (self.chunk_size is None and not self.admitted):
            return input_len if input_len + reserve <= memory else None
        # Chunk: only the chunk's tokens need memory now; the reserve is checked when the last chunk is admitted.
        take = min(limit, memory)
        return take if take > 0 and self.chunk_size is not None else None

    def take(self, req: Req, extend_len: int, reserve: int) -> None:
        self.rem_total_tokens -= extend_len + reserve + self.page_slack
        self.rem_input_tokens -= extend_len
        self.admitted.append(req)
