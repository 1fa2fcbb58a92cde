"""Prefix caching: the radix tree that lets requests share the KV of common token prefixes."""

from radixlm.cache.radix_cache import MatchResult, RadixCache, TreeNode

__all__ = ["MatchResult", "RadixCache", "TreeNode"]
