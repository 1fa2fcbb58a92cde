"""Giving requests KV slots and taking them back: the allocator and the ``req_to_token`` table moved together.

These run on the scheduler's side of the contract (it owns the memory bookkeeping; the executor only reads the
table and writes K/V at the slots it is given).  None of them reads a device value on the host, so a batch can
be planned while the previous step still runs on the GPU.
"""

from __future__ import annotations

import torch

from radixlm.mem.allocator import TokenToKVPoolAllocator, token_positions
from radixlm.mem.req_to_token_pool import ReqToTokenPool
from radixlm.utils.device import to_device_async


def assign_kv_slots(req_to_token_pool: ReqToTokenPool, allocator: TokenToKVPoolAllocator, rows: list[int],
                    prefix_lens: list[int], seq_lens: list[int]) -> torch.Tensor | None:
    """Allocate KV slots for positions ``prefix_lens[i] .. seq_lens[i] - 1`` of request row ``rows[i]``, map them
    in ``req_to_token`` and return them (``[sum(seq - prefix)]`` int64 on the pool's device, request after
    request); None, changing nothing, when the pool is short."""
    table = req_to_token_pool.req_to_token
    last_locs = None
    if allocator.page_size > 1:
        # Slot of each request's last stored token: a partly filled last page continues from there.
        at = to_device_async(torch.tensor([rows, [max(p - 1, 0) for p in prefix_lens]]), table.device)
        last_locs = table[at[0], at[1]].long()
    slots = allocator.alloc_extend(prefix_lens, seq_lens, last_locs)
    if slots is None:
        return None
    req, pos = token_positions(torch.tensor(prefix_lens), torch.tensor(seq_lens))
    at = to_device_async(torch.stack([torch.tensor(rows)[req], pos]), table.device)
    table[at[0], at[1]] = slots.to(torch.int32)
    return slots


def release_kv_tail(req_to_token_pool: ReqToTokenPool, allocator: TokenToKVPoolAllocator, row: int, keep_len: int,
                    kv_len: int) -> None:
    """Roll a request back from ``kv_len`` to ``keep_len`` stored tokens (rejected speculative tokens): free the
    pages that hold only positions ``>= keep_len``.  A partly kept page stays with the request; its slots past
    ``keep_len`` are overwritten by the next tokens, which continue that page.  The caller keeps the rolled-back
    positions out of the radix cache (they were never inserted)."""
    if not 0 <= keep_len <= kv_len:
        raise ValueError(f"cannot roll back from {kv_len} to {keep_len} tokens")
    p = allocator.page_size
    first_free = -(-keep_len // p) * p
    if first_free < kv_len:
        allocator.free(req_to_token_pool.req_to_token[row, first_free:kv_len].long())
