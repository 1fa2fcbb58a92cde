"""Paged KV memory: request rows (``ReqToTokenPool``), KV slots (``TokenToKVPoolAllocator``), the per-layer buffers
(``KVPool`` in the layout of a ``KVCacheSpec``), and assigning slots to requests (``assign``)."""

from radixlm.mem.allocator import TokenToKVPoolAllocator
from radixlm.mem.assign import assign_kv_slots, release_kv_tail
from radixlm.mem.kv_memory import KVMemory
from radixlm.mem.kv_pool import KVPool, MHAKVPool, MLAKVPool, create_kv_pool
from radixlm.mem.kv_spec import KVCacheSpec
from radixlm.mem.req_to_token_pool import ReqToTokenPool

__all__ = ["KVCacheSpec", "KVMemory", "KVPool", "MHAKVPool", "MLAKVPool", "ReqToTokenPool", "TokenToKVPoolAllocator",
           "assign_kv_slots", "create_kv_pool", "release_kv_tail"]
