from radixlm.mem.allocator import TokenToKVPoolAllocator
from radixlm.mem.kv_pool import MHATokenToKVPool
from radixlm.mem.req_to_token_pool import ReqToTokenPool

__all__ = ["MHATokenToKVPool", "ReqToTokenPool", "TokenToKVPoolAllocator"]
