"""The waiting queue and admission: which requests the next prefill step takes, and how much of each."""

from __future__ import annotations

import time
from collections.abc import Iterator

from radixlm.cache import RadixCache
from radixlm.config import ServerArgs
from radixlm.core import Req, ReqState
from radixlm.mem import KVMemory
from radixlm.scheduler.policy import (AdapterSlots, PrefillBudget, cache_match_key, order_waiting_queue,
                                     reserved_decode_tokens)

# A waiting request whose uncached tokens start with this many tokens equal to those of a request already in
# the prefill batch is deferred by one step, so the shared part is computed once (SGLang's in-batch prefix
# caching); shorter overlaps are not worth a step of latency.
IN_BATCH_PREFIX_MIN = 32


class PrefillManager:
    """Owns the waiting queue (state WAITING) and the request whose prompt is being prefilled in chunks.

    ``admit`` locks each admitted request's cached prefix, gives it a ``req_to_token`` row with that prefix
    mapped, moves it to PREFILLING and sets ``extend_len`` (all of its uncached tokens, or a chunk).

    LoRA: the running requests, the chunked one and the admitted ones name at most ``--max-loras-per-batch``
    distinct adapters.  A waiting request whose adapter would exceed that waits, and requests behind it may still
    be admitted; starvation is bounded by ``adapter_barrier``: the first request refused for the adapter limit
    (in policy order; under fcfs the oldest) holds back every OTHER adapter request until it is admitted itself.
    Base-model requests are never held back (they take no adapter slot).  Meanwhile the running requests finish
    (each within its max_new_tokens / context length) and nothing refills their adapters, so the barrier's
    adapter gets a slot after at most one generation of the running requests.
    """

    def __init__(self, args: ServerArgs, memory: KVMemory, tree_cache: RadixCache) -> None:
        self.args = args
        self.memory = memory
        self.tree_cache = tree_cache
        self.waiting: list[Req] = []
        self.chunked_req: Req | None = None  # a prompt being prefilled chunk by chunk
        self.adapter_barrier: Req | None = None  # see the class docstring
        # Lifetime totals of first admissions (the cache hit rate of metrics)
        self.admitted_input_tokens = self.admitted_cached_tokens = 0

    def remove(self, rid: str) -> Req | None:
        for req in self.waiting:
            if req.rid == rid:
                self.waiting.remove(req)
                if req is self.adapter_barrier:
                    self.adapter_barrier = None
                return req
        return None

    def budget(self, running: list[Req], new_token_ratio: float, decode_rows: int) -> PrefillBudget:
        """What a prefill step may take now: free + evictable KV minus the running requests' decode reserve;
        ``decode_rows`` one-token rows riding along in the same step (MIXED) use part of the token budget."""
        reserve = sum(reserved_decode_tokens(r, new_token_ratio) for r in running)
        chunk = self.args.chunked_prefill_size if self.args.chunked_prefill_size > 0 else None
        if chunk is not None:
            chunk = max(chunk - decode_rows, 1)
        return PrefillBudget(self.memory.allocator.available_size() + self.tree_cache.evictable_size() - reserve,
                             max(self.args.max_prefill_tokens - decode_rows, 1), chunk,
                             page_slack=self.memory.page_size - 1)

    def admit(self, running: list[Req], new_token_ratio: float, decode_rows: int = 0) -> list[Req]:
        """Choose the requests of the next prefill step (the chunked request first), lock their cached prefixes
        and give them rows; returns them in row order."""
        if not self.waiting and self.chunked_req is None:
            return []
        budget = self.budget(running, new_token_ratio, decode_rows)
        if self.chunked_req is not None:
            req = self.chunked_req
            take = budget.plan(req.seq_len - req.kv_len, 0)
            if take is None:
                return []
            req.extend_len = take
            budget.take(req, take, 0)
        num_running = len(running) + len(budget.admitted)
        # (adapter, tokens) of this batch's requests, for in-batch prefix sharing (within one adapter only)
        admitted_ids: list[tuple[str | None, list[int]]] = []
        adapters = self._adapter_slots(running)
        for req in self._adapter_gated(adapters, record=True):
            if (self.chunked_req is not None or not budget.can_take()
                    or num_running >= self.memory.max_running_requests
                    or self.memory.req_to_token_pool.available_size() == 0):
                break
            match = self.tree_cache.match_prefix(cache_match_key(req), req.lora_name)
            prefix_len = len(match.device_indices)
            if not self.tree_cache.disable and _shares_uncached_prefix(req, prefix_len, admitted_ids):
                continue  # wait one step: the batch caches the shared part, then this request reuses it
            reserve = reserved_decode_tokens(req, new_token_ratio)
            # Locking the matched prefix makes its evictable tokens protected: the budget counted them as memory
            # that eviction could free, so it shrinks by as much (a retracted request re-matches all its KV).
            locked = self.tree_cache.inc_lock_ref(match.last_node)
            budget.rem_total_tokens -= locked
            take = budget.plan(req.seq_len - prefix_len, reserve)
            if take is None:
                self.tree_cache.dec_lock_ref(match.last_node)
                budget.rem_total_tokens += locked
                break
            req.prefix_indices, req.last_node = match.device_indices, match.last_node
            if req.num_retractions == 0:
                req.cached_tokens = prefix_len
                req.queue_time = time.time() - req.created_time
                self.admitted_input_tokens += len(req.origin_input_ids)
                self.admitted_cached_tokens += prefix_len
            req.req_pool_idx = self.memory.req_to_token_pool.alloc(1)[0]
            self.memory.req_to_token_pool.write(req.req_pool_idx, 0, match.device_indices)
            req.kv_len, req.extend_len = prefix_len, take
            req.move_to(ReqState.PREFILLING)
            budget.take(req, take, reserve)
            adapters.add(req.lora_name)
            if req is self.adapter_barrier:
                self.adapter_barrier = None
            admitted_ids.append((req.lora_name, req.all_ids()))
            num_running += 1
            if take < req.seq_len - prefix_len:
                self.chunked_req = req
        admitted = set(map(id, budget.admitted))
        self.waiting = [r for r in self.waiting if id(r) not in admitted]
        return budget.admitted

    def could_admit(self, running: list[Req], new_token_ratio: float) -> bool:
        """Whether ``admit`` would take the first waiting request that the adapter limit lets in (in policy
        order) now, planned the same way without locking anything.  While it would not (the KV pool is full, or
        only requests of other adapters wait), the overlap schedule keeps chaining decode steps instead of
        reading each one back for an admission that fails."""
        if not self.waiting or len(running) >= self.memory.max_running_requests:
            return False
        if self.memory.req_to_token_pool.available_size() == 0:
            return False
        budget = self.budget(running, new_token_ratio, 0)
        if not budget.can_take():
            return False
        req = next(self._adapter_gated(self._adapter_slots(running), record=False), None)
        if req is None:
            return False
        prefix_len = len(self.tree_cache.match_prefix(cache_match_key(req), req.lora_name).device_indices)
        return budget.plan(req.seq_len - prefix_len, reserved_decode_tokens(req, new_token_ratio)) is not None

    def _adapter_slots(self, running: list[Req]) -> AdapterSlots:
        holders = running + ([self.chunked_req] if self.chunked_req is not None else [])
        return AdapterSlots(self.args.max_loras_per_batch, (r.lora_name for r in holders))

    def _adapter_gated(self, adapters: AdapterSlots, record: bool) -> Iterator[Req]:
        """The waiting requests in policy order, less those the adapter limit holds back (see the class
        docstring); ``adapters`` is read lazily, so admissions between two yields count.  ``record``: remember a
        new barrier (``admit``; ``could_admit`` only looks)."""
        barrier = self.adapter_barrier
        if barrier is not None and not any(r is barrier for r in self.waiting):
            barrier = self.adapter_barrier = None
        for req in order_waiting_queue(self.waiting, self.args.schedule_policy, self.tree_cache):
            if req.lora_name is not None:
                if barrier is not None and req is not barrier:
                    continue
                if not adapters.fits(req.lora_name):
                    if barrier is None:
                        barrier = req
                        if record:
                            self.adapter_barrier = req
                    continue
            yield req


def _shares_uncached_prefix(req: Req, prefix_len: int, admitted_ids: list[tuple[str | None, list[int]]]) -> bool:
    """True when a request of the batch being built, of the same adapter, starts with the same IN_BATCH_PREFIX_MIN
    tokens beyond this request's cached prefix: admitting both would compute that shared part twice."""
    ids = req.all_ids()
    end = prefix_len + IN_BATCH_PREFIX_MIN
    return len(ids) > end and any(lora == req.lora_name and other[:end] == ids[:end] for lora, other in admitted_ids)
