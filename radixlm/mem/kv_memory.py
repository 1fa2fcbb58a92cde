"""The memory bookkeeping that the scheduler owns: request rows and KV slots."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from radixlm.mem.allocator import TokenToKVPoolAllocator
from radixlm.mem.req_to_token_pool import ReqToTokenPool


@dataclass
class KVMemory:
    """``req_to_token`` rows for up to ``max_running_requests`` requests and the allocator of the KV pool's slots.

    The executor sizes it (from the KV spec and the device's memory) and holds the KV buffers; the scheduler
    assigns rows and slots (``radixlm.mem.assign``) and the radix cache keeps slots alive.  Nothing here refers
    to a model, so a scheduler can be tested against a fake executor with real memory bookkeeping.
    """

    req_to_token_pool: ReqToTokenPool
    allocator: TokenToKVPoolAllocator
    max_running_requests: int

    @classmethod
    def create(cls, max_total_tokens: int, page_size: int, max_running_requests: int, context_len: int,
               device: torch.device | str) -> "KVMemory":
        return cls(ReqToTokenPool(max_running_requests, context_len, device),
                   TokenToKVPoolAllocator(max_total_tokens, page_size, device), max_running_requests)

    @property
    def max_total_num_tokens(self) -> int:
        return self.allocator.size

    @property
    def page_size(self) -> int:
        return self.allocator.page_size
