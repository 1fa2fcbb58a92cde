"""Unit tests for radixlm.cache: the radix prefix cache, by hand cases and a brute-force lifecycle model."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from radixlm.cache import RadixCache, TreeNode
from radixlm.core import Req, SamplingParams
from radixlm.mem import ReqToTokenPool, TokenToKVPoolAllocator


def make_cache(size: int = 64, page_size: int = 1, rows: int = 4, max_ctx: int = 32,
               disable: bool = False) -> tuple[RadixCache, TokenToKVPoolAllocator, ReqToTokenPool]:
    allocator = TokenToKVPoolAllocator(size, page_size)
    pool = ReqToTokenPool(rows, max_ctx, "cpu")
    return RadixCache(pool, allocator, page_size=page_size, disable=disable), allocator, pool


def slots(*xs: int) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.int64)


def as_list(t: torch.Tensor) -> list[int]:
    assert t.dtype == torch.int64
    return [int(x) for x in t.tolist()]


def child_key(key: list[int], page_size: int) -> int | tuple[int, ...]:
    return key[0] if page_size == 1 else tuple(key[:page_size])


def path_key(node: TreeNode) -> list[int]:
    """Token sequence spelled from the root down to ``node``."""
    parts = []
    while node.parent is not None:
        parts.append(node.key)
        node = node.parent
    return [t for part in reversed(parts) for t in part]


def start_req(cache: RadixCache, allocator: TokenToKVPoolAllocator, pool: ReqToTokenPool, prompt: list[int],
              outputs: tuple[int, ...] = (), kv_len: int | None = None, use_cache: bool = True) -> Req:
    """A request with KV for its first ``kv_len`` tokens: the cached prefix (if matched) plus fresh slots."""
    req = Req(rid=str(prompt), origin_input_ids=list(prompt), sampling_params=SamplingParams(),
              output_ids=list(outputs))
    (req.req_pool_idx,) = pool.alloc(1)
    if use_cache:
        match = cache.match_prefix(req.all_ids())
        req.prefix_indices, req.last_node = match.device_indices, match.last_node
        cache.inc_lock_ref(match.last_node)
    prefix_len = req.prefix_indices.numel()
    kv_len = len(req.all_ids()) if kv_len is None else kv_len
    fresh = allocator.alloc(kv_len - prefix_len)
    assert fresh is not None
    pool.write(req.req_pool_idx, 0, torch.cat([req.prefix_indices, fresh]))
    req.kv_len = kv_len
    return req


def row(pool: ReqToTokenPool, req: Req) -> list[int]:
    return [int(x) for x in pool.req_to_token[req.req_pool_idx, : req.kv_len].tolist()]


# ----------------------------------------------------------------------------------------------- hand cases


def test_insert_match_and_split() -> None:
    cache, _, _ = make_cache()
    value = slots(10, 11, 12, 13, 14)
    assert cache.insert([1, 2, 3, 4, 5], value) == 0
    value.fill_(0)  # the tree keeps its own copy of the slots
    assert cache.insert([1, 2, 3, 9], slots(20, 21, 22, 23)) == 3
    assert cache.total_size() == 6 and cache.evictable_size() == 6

    m = cache.match_prefix([1, 2, 3])
    assert as_list(m.device_indices) == [10, 11, 12] and m.last_node.key == [1, 2, 3]
    m = cache.match_prefix([1, 2, 3, 9, 7])
    assert as_list(m.device_indices) == [10, 11, 12, 23] and m.last_node.key == [9]
    m = cache.match_prefix([1, 2, 3, 4, 6])  # ends inside [4, 5]: split into [4] -> [5]
    assert as_list(m.device_indices) == [10, 11, 12, 13] and m.last_node.key == [4]
    assert [c.key for c in m.last_node.children.values()] == [[5]]
    assert as_list(m.last_node.children[5].value) == [14]
    m = cache.match_prefix([1, 2])  # splits the shared [1, 2, 3]
    assert as_list(m.device_indices) == [10, 11] and path_key(m.last_node) == [1, 2]
    assert [c.key for c in m.last_node.children.values()] == [[3]]
    assert as_list(cache.match_prefix([1, 2, 3, 4, 5]).device_indices) == [10, 11, 12, 13, 14]
    assert cache.total_size() == 6
    assert "key=[5]" in cache.pretty_print()


def test_insert_returns_already_cached_length_without_splitting() -> None:
    cache, _, _ = make_cache()
    cache.insert([1, 2, 3, 4], slots(1, 2, 3, 4))
    assert cache.insert([1, 2, 3, 4], slots(5, 6, 7, 8)) == 4
    assert cache.insert([1, 2], slots(5, 6)) == 2
    assert len(cache.root_node.children[1].key) == 4  # a key ending inside an edge needs no split
    assert cache.insert([1, 2, 3, 4, 5, 6], slots(9, 9, 9, 9, 7, 8)) == 4
    assert as_list(cache.match_prefix([1, 2, 3, 4, 5, 6]).device_indices) == [1, 2, 3, 4, 7, 8]
    assert cache.total_size() == 6


def test_empty_keys_and_empty_tree() -> None:
    cache, _, _ = make_cache()
    m = cache.match_prefix([1, 2, 3])
    assert m.device_indices.numel() == 0 and m.last_node is cache.root_node
    assert cache.insert([], slots()) == 0
    m = cache.match_prefix([])
    assert m.device_indices.numel() == 0 and m.last_node is cache.root_node
    assert cache.total_size() == 0 and cache.evict(10) == 0
    with pytest.raises(ValueError):
        cache.insert([1, 2], slots(1))


def test_disabled_cache_never_caches_and_frees_everything() -> None:
    cache, allocator, pool = make_cache(disable=True)
    assert cache.insert([1, 2, 3], slots(1, 2, 3)) == 0 and cache.total_size() == 0
    req = start_req(cache, allocator, pool, [1, 2, 3, 4], outputs=(5,), kv_len=4)
    assert req.prefix_indices.numel() == 0 and req.last_node is cache.root_node
    cache.cache_unfinished_req(req)
    assert req.prefix_indices.numel() == 0 and allocator.available_size() == 60
    cache.cache_finished_req(req)
    assert allocator.available_size() == 64 and pool.available_size() == 4 and req.req_pool_idx is None
    assert cache.total_size() == 0 and cache.evict(5) == 0 and cache.flush()


def test_lock_refs_sizes_and_return_values() -> None:
    cache, allocator, _ = make_cache()
    cache.insert([1, 2, 3, 4, 5], allocator.alloc(5))
    cache.insert([1, 2, 3, 9], torch.cat([cache.match_prefix([1, 2, 3]).device_indices, allocator.alloc(1)]))
    a = cache.match_prefix([1, 2, 3, 4, 5]).last_node
    b = cache.match_prefix([1, 2, 3, 9]).last_node
    assert cache.inc_lock_ref(a) == 5
    assert (cache.protected_size(), cache.evictable_size()) == (5, 1)
    assert cache.inc_lock_ref(a) == 0
    assert cache.inc_lock_ref(b) == 1
    assert cache.dec_lock_ref(a) == 0
    assert cache.evict(100) == 0  # everything is locked
    assert cache.dec_lock_ref(a) == -2
    assert (cache.protected_size(), cache.evictable_size()) == (4, 2)
    assert cache.evict(100) == 2  # only [4, 5]; [1, 2, 3] and [9] are still locked through b
    assert cache.match_prefix([1, 2, 3, 9, 9]).device_indices.numel() == 4
    assert cache.match_prefix([1, 2, 3, 4]).device_indices.numel() == 3
    assert cache.dec_lock_ref(b) == -4
    assert (cache.protected_size(), cache.evictable_size()) == (0, 4)
    with pytest.raises(RuntimeError):
        cache.dec_lock_ref(b)
    assert cache.evict(100) == 4 and cache.total_size() == 0
    assert allocator.available_size() == 64


def test_split_of_locked_node_keeps_lock_state() -> None:
    cache, allocator, _ = make_cache()
    cache.insert([1, 2, 3, 4, 5], allocator.alloc(5))
    leaf = cache.match_prefix([1, 2, 3, 4, 5]).last_node
    cache.inc_lock_ref(leaf)
    upper = cache.match_prefix([1, 2]).last_node
    assert upper is not leaf and upper.lock_ref == 1 and leaf.parent is upper
    assert upper.last_access_time > leaf.last_access_time  # the unmatched lower half was not accessed
    assert (cache.protected_size(), cache.evictable_size()) == (5, 0)
    assert cache.dec_lock_ref(leaf) == -5
    assert upper.lock_ref == 0 and cache.evictable_size() == 5


def test_flush_refuses_while_locked() -> None:
    cache, allocator, _ = make_cache()
    cache.insert([1, 2, 3], allocator.alloc(3))
    node = cache.match_prefix([1, 2]).last_node
    cache.inc_lock_ref(node)
    assert not cache.flush() and cache.total_size() == 3
    cache.dec_lock_ref(node)
    assert cache.flush() and cache.total_size() == 0 and allocator.available_size() == 64
    assert cache.match_prefix([1, 2, 3]).device_indices.numel() == 0


def test_eviction_is_least_recently_used_first() -> None:
    cache, allocator, _ = make_cache()
    for first in (1, 2, 3):
        cache.insert([first, first], allocator.alloc(2))
    cache.match_prefix([1, 1])  # [1, 1] is now the most recently used
    assert cache.evict(1) == 2
    assert cache.match_prefix([2, 2]).device_indices.numel() == 0
    assert cache.match_prefix([3, 3]).device_indices.numel() == 2  # touching [3, 3] makes [1, 1] the oldest
    assert cache.evict(2) == 2
    assert cache.match_prefix([1, 1]).device_indices.numel() == 0
    assert cache.evict(1) == 2 and cache.total_size() == 0 and allocator.available_size() == 64


def test_parent_becomes_evictable_after_its_children() -> None:
    cache, allocator, _ = make_cache()
    cache.insert([1, 2, 3], allocator.alloc(3))  # t1
    cache.insert([1, 2, 4], torch.cat([cache.match_prefix([1, 2]).device_indices, allocator.alloc(1)]))
    cache.insert([7], allocator.alloc(1))  # newest
    assert cache.evict(1) == 1 and cache.match_prefix([1, 2, 3]).device_indices.numel() == 2
    # that match touched [1, 2] only; [4] is now older than [7]
    assert cache.evict(1) == 1 and cache.match_prefix([1, 2, 4]).device_indices.numel() == 2
    assert cache.evict(1) == 1 and cache.match_prefix([7]).device_indices.numel() == 0  # [1, 2] was just touched
    assert cache.evict(1) == 2 and cache.total_size() == 0 and allocator.available_size() == 64


def test_locked_inner_node_survives_while_children_go() -> None:
    cache, allocator, _ = make_cache()
    cache.insert([1, 2, 3, 4], allocator.alloc(4))
    cache.insert([1, 2, 5, 6], torch.cat([cache.match_prefix([1, 2]).device_indices, allocator.alloc(2)]))
    inner = cache.match_prefix([1, 2]).last_node
    cache.inc_lock_ref(inner)
    assert cache.evict(100) == 4 and cache.total_size() == 2 and not inner.children
    cache.dec_lock_ref(inner)
    assert cache.evict(1) == 2 and allocator.available_size() == 64


def test_namespaces_never_share_and_evict_together() -> None:
    """The same tokens under the base model and two adapters are three entries with their own slots; locks,
    sizes and LRU eviction span the namespaces."""
    cache, allocator, _ = make_cache()
    assert cache.insert([1, 2, 3], slots(1, 2, 3)) == 0
    assert cache.insert([1, 2, 3], slots(4, 5, 6), "a") == 0  # nothing of the base model counts as cached
    assert cache.insert([1, 2, 9], slots(7, 8, 9), "a") == 2  # ...but the adapter's own prefix does
    assert as_list(cache.match_prefix([1, 2, 3]).device_indices) == [1, 2, 3]
    assert as_list(cache.match_prefix([1, 2, 3, 4], "a").device_indices) == [4, 5, 6]
    miss = cache.match_prefix([1, 2, 3], "b")
    assert miss.device_indices.numel() == 0 and miss.last_node is cache.root("b") is not cache.root_node
    assert cache.namespaces() == [None, "a", "b"] and cache.total_size() == 7
    node = cache.match_prefix([1, 2], "a").last_node
    assert cache.inc_lock_ref(node) == 2 and (cache.protected_size(), cache.evictable_size()) == (2, 5)
    cache.match_prefix([1, 2, 9], "a")  # the base model's [1, 2, 3] is now the least recently used
    assert cache.evict(1) == 3 and cache.match_prefix([1, 2, 3]).device_indices.numel() == 0
    assert cache.evict(100) == 2 and cache.total_size() == 2  # the adapter's locked [1, 2] stays
    cache.dec_lock_ref(node)
    assert cache.flush() and cache.namespaces() == [None]


def test_drop_namespace_frees_only_that_adapter() -> None:
    cache, allocator, _ = make_cache(size=16)
    cache.insert([1, 2], allocator.alloc(2))
    cache.insert([1, 2, 3], allocator.alloc(3), "a")
    cache.insert([1, 2], allocator.alloc(2), "b")
    node = cache.match_prefix([1, 2, 3], "a").last_node
    cache.inc_lock_ref(node)
    with pytest.raises(RuntimeError, match="cannot drop namespace 'a': a request still holds its prefix"):
        cache.drop_namespace("a")
    cache.dec_lock_ref(node)
    assert cache.drop_namespace("a") == 3 and cache.drop_namespace("unknown") == 0
    assert allocator.available_size() == 12 and cache.total_size() == cache.evictable_size() == 4
    assert cache.namespaces() == [None, "b"]
    assert cache.match_prefix([1, 2, 3], "a").device_indices.numel() == 0  # a fresh, empty tree
    assert cache.match_prefix([1, 2], "b").device_indices.numel() == 2


def test_request_helpers_use_the_request_adapter() -> None:
    cache, allocator, pool = make_cache()
    base = start_req(cache, allocator, pool, [5, 6, 7])
    cache.cache_finished_req(base)
    req = Req(rid="lora", origin_input_ids=[5, 6, 7], sampling_params=SamplingParams(), lora_name="a")
    (req.req_pool_idx,) = pool.alloc(1)
    match = cache.match_prefix(req.all_ids(), req.lora_name)
    assert match.device_indices.numel() == 0  # the base model's KV is not the adapter's
    req.prefix_indices, req.last_node = match.device_indices, match.last_node
    pool.write(req.req_pool_idx, 0, allocator.alloc(3))
    req.kv_len = 3
    cache.cache_unfinished_req(req)
    assert path_key(req.last_node) == [5, 6, 7] and req.last_node.lock_ref == 1
    assert cache.match_prefix([5, 6, 7]).last_node is not req.last_node
    cache.cache_finished_req(req)
    assert cache.total_size() == cache.evictable_size() == 6 and allocator.available_size() == 58


def test_request_lifecycle_frees_duplicates_and_moves_locks() -> None:
    cache, allocator, pool = make_cache()
    r1 = start_req(cache, allocator, pool, [1, 2, 3, 4], outputs=(5,), kv_len=4)
    cache.cache_finished_req(r1)
    assert r1.req_pool_idx is None and pool.available_size() == 4
    assert cache.total_size() == 4 and allocator.available_size() == 60 and cache.protected_size() == 0

    r2 = start_req(cache, allocator, pool, [1, 2, 3, 4, 6, 7])
    assert r2.prefix_indices.numel() == 4
    cache.cache_unfinished_req(r2)
    assert r2.prefix_indices.numel() == 6 and r2.last_node.key == [6, 7] and cache.protected_size() == 6
    assert row(pool, r2) == as_list(r2.prefix_indices) and allocator.available_size() == 58

    # Computed without using the cache: its slots for the cached tokens are duplicates and go back.
    r3 = start_req(cache, allocator, pool, [1, 2, 3, 8], use_cache=False)
    own = row(pool, r3)
    cache.cache_unfinished_req(r3)
    tree3 = as_list(cache.match_prefix([1, 2, 3]).device_indices)
    assert row(pool, r3) == tree3 + own[3:] and as_list(r3.prefix_indices) == row(pool, r3)
    assert allocator.available_size() == 58 - 1 and r3.last_node.key == [8]
    assert cache.protected_size() == 7 and r3.req_pool_idx is not None
    cache.cache_finished_req(r3)
    cache.cache_finished_req(r2)
    assert cache.protected_size() == 0 and cache.total_size() == 7 and allocator.available_size() == 57
    assert pool.available_size() == 4


def test_paged_matches_whole_pages_and_frees_tails() -> None:
    cache, allocator, pool = make_cache(page_size=4)
    a = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    r = start_req(cache, allocator, pool, a)  # 10 tokens: 3 pages
    assert allocator.available_size() == 64 - 12
    first8 = row(pool, r)[:8]
    cache.cache_finished_req(r)
    assert cache.total_size() == 8 and allocator.available_size() == 64 - 8  # the tail page went back
    assert as_list(cache.match_prefix(a).device_indices) == first8
    # Diverges inside the second page of the single node [1..8]: the split must land on the page boundary.
    m = cache.match_prefix([1, 2, 3, 4, 5, 6, 0, 8])
    assert as_list(m.device_indices) == first8[:4] and m.last_node.key == [1, 2, 3, 4]
    assert as_list(cache.match_prefix(a[:7]).device_indices) == first8[:4]
    assert cache.match_prefix(a[:3]).device_indices.numel() == 0
    with pytest.raises(ValueError):
        cache.insert([1, 2, 3], slots(1, 2, 3))

    # Shares the first page only: the node [1..8] splits at the page boundary.
    b = [1, 2, 3, 4, 5, 6, 0, 0, 7]
    r = start_req(cache, allocator, pool, b, kv_len=6)
    assert r.prefix_indices.numel() == 4
    own_tail = row(pool, r)[4:]
    cache.cache_unfinished_req(r)  # nothing new is page-aligned: 4 cached + 2 owned
    assert r.prefix_indices.numel() == 4 and row(pool, r)[4:] == own_tail
    ext = allocator.alloc_extend([6], [9], [own_tail[-1]])
    pool.write(r.req_pool_idx, 6, ext)
    r.kv_len = 9
    cache.cache_finished_req(r)
    assert cache.total_size() == 12 and cache.protected_size() == 0
    assert allocator.available_size() == 64 - 12
    assert as_list(cache.match_prefix(b).device_indices)[:4] == first8[:4]
    assert cache.match_prefix(b).device_indices.numel() == 8


# ----------------------------------------------------------------------------------- brute-force model


class LifecycleSim:
    """Drives a RadixCache, a real allocator and request table through random request lifecycles.

    ``model`` maps every cached token prefix of whole pages to the slots of its last page; it only grows on
    inserts (entries never change) and shrinks on evict/flush, and must always equal the tree's own map.
    """

    def __init__(self, seed: int, page_size: int, pool_size: int, rows: int = 6, max_ctx: int = 40) -> None:
        self.rng = random.Random(seed)
        self.p = page_size
        self.max_ctx = max_ctx
        self.cache, self.alloc, self.pool = make_cache(pool_size, page_size, rows, max_ctx)
        self.model: dict[tuple[int, ...], tuple[int, ...]] = {}
        self.live: list[Req] = []
        self.num_reqs = 0

    # --- expectations from the model alone
    def cached_len(self, tokens: list[int]) -> int:
        n = 0
        while n + self.p <= len(tokens) and tuple(tokens[: n + self.p]) in self.model:
            n += self.p
        return n

    def model_slots(self, tokens: list[int]) -> list[int]:
        return [s for i in range(0, len(tokens), self.p) for s in self.model[tuple(tokens[: i + self.p])]]

    def random_key(self) -> list[int]:
        """Mostly a cached prefix or a live request's tokens (so that requests race to cache the same
        tokens and duplicates occur), cut anywhere and extended with random tokens."""
        r = self.rng.random()
        if r < 0.3 and self.live:
            base = self.rng.choice(self.live).all_ids()
        elif r < 0.8 and self.model:
            base = list(self.rng.choice(list(self.model)))
        else:
            base = []
        base = base[: self.rng.randint(0, len(base))]
        return base + [self.rng.randint(0, 3) for _ in range(self.rng.randint(0, 12))]

    # --- the tree as it is
    def tree_map(self) -> dict[tuple[int, ...], tuple[int, ...]]:
        out: dict[tuple[int, ...], tuple[int, ...]] = {}
        stack: list[tuple[TreeNode, tuple[int, ...]]] = [(self.cache.root_node, ())]
        while stack:
            node, path = stack.pop()
            for ck, child in node.children.items():
                assert child.parent is node and len(child.key) == child.value.numel() > 0
                assert len(child.key) % self.p == 0
                assert ck == child_key(child.key, self.p)
                vals = as_list(child.value)
                for i in range(0, len(child.key), self.p):
                    page = vals[i : i + self.p]
                    assert page == list(range(page[0], page[0] + self.p)) and page[0] % self.p == 0
                    out[path + tuple(child.key[: i + self.p])] = tuple(page)
                stack.append((child, path + tuple(child.key)))
        return out

    def free_pages(self) -> set[int]:
        n = self.alloc.available_size()
        taken = self.alloc.alloc(n)
        assert taken is not None and taken.numel() == n
        self.alloc.free(taken)
        return {int(s) // self.p for s in taken.tolist()}

    def check(self) -> None:
        tm = self.tree_map()
        assert tm == self.model
        # (a) every page is free, cached, or owned by exactly one live request
        owners = [self.free_pages(), {s[0] // self.p for s in tm.values()}]
        for req in self.live:
            r = row(self.pool, req)
            p_len = req.prefix_indices.numel()
            assert r[:p_len] == as_list(req.prefix_indices) == self.model_slots(req.all_ids()[:p_len])
            owners.append({s // self.p for s in r[p_len:]})
        assert sum(len(o) for o in owners) == self.alloc.num_pages
        assert set().union(*owners) == set(range(1, self.alloc.num_pages + 1))
        # (c) locks and sizes against a recomputation
        expected_locks: Counter[int] = Counter()
        for req in self.live:
            assert path_key(req.last_node) == req.all_ids()[: req.prefix_indices.numel()]
            node = req.last_node
            while node is not self.cache.root_node:
                assert node.parent.children[child_key(node.key, self.p)] is node
                expected_locks[node.id] += 1
                node = node.parent
        sizes = [0, 0]  # [evictable, protected] tokens
        stack = list(self.cache.root_node.children.values())
        while stack:
            node = stack.pop()
            assert node.lock_ref == expected_locks[node.id]
            sizes[node.lock_ref > 0] += len(node.key)
            stack.extend(node.children.values())
        assert [self.cache.evictable_size(), self.cache.protected_size()] == sizes
        assert self.cache.total_size() == len(tm) * self.p
        # (b) matches are the longest cached prefix, with the slots inserted for it
        for _ in range(2):
            key = self.random_key()
            n = self.cached_len(key)
            assert as_list(self.cache.match_prefix(key).device_indices) == self.model_slots(key[:n])
        assert self.tree_map() == tm  # splits by matching change nothing

    # --- operations, each checked against what the model predicts
    def insert_expectation(self, req: Req) -> tuple[list[int], int, int]:
        tokens, kv = req.all_ids()[: req.kv_len], row(self.pool, req)
        aligned = req.kv_len - req.kv_len % self.p
        already = self.cached_len(tokens[:aligned])
        assert req.prefix_indices.numel() <= already
        for i in range(already, aligned, self.p):
            self.model[tuple(tokens[: i + self.p])] = tuple(kv[i : i + self.p])
        return kv, aligned, already

    def finish(self, req: Req) -> None:
        before, rows_before = self.alloc.available_size(), self.pool.available_size()
        kv, aligned, already = self.insert_expectation(req)
        self.cache.cache_finished_req(req)
        self.live.remove(req)
        tail = self.p if req.kv_len > aligned else 0
        assert self.alloc.available_size() == before + already - req.prefix_indices.numel() + tail
        assert self.pool.available_size() == rows_before + 1 and req.req_pool_idx is None

    def cache_unfinished(self, req: Req) -> None:
        before = self.alloc.available_size()
        kv, aligned, already = self.insert_expectation(req)
        old_prefix = req.prefix_indices.numel()
        self.cache.cache_unfinished_req(req)
        assert self.alloc.available_size() == before + already - old_prefix
        assert as_list(req.prefix_indices) == self.model_slots(req.all_ids()[:aligned])
        assert row(self.pool, req)[aligned:] == kv[aligned:]

    def evict(self, num_tokens: int) -> None:
        before, evictable = self.alloc.available_size(), self.cache.evictable_size()
        evicted = self.cache.evict(num_tokens)
        assert min(num_tokens, evictable) <= evicted <= evictable
        assert evicted >= num_tokens or self.cache.evictable_size() == 0
        tm = self.tree_map()
        assert all(self.model[k] == v for k, v in tm.items())
        assert (len(self.model) - len(tm)) * self.p == evicted
        assert self.alloc.available_size() == before + evicted
        self.model = tm

    def flush(self) -> None:
        before, total, protected = self.alloc.available_size(), self.cache.total_size(), self.cache.protected_size()
        assert self.cache.flush() == (protected == 0)
        if protected == 0:
            self.model = {}
            assert self.alloc.available_size() == before + total and self.cache.total_size() == 0

    def grow(self, req: Req, target: int) -> bool:
        """Give ``req`` KV up to ``target`` tokens, evicting if short; False if memory cannot be found."""
        args = ([req.kv_len], [target], [row(self.pool, req)[-1] if req.kv_len else 0])
        fresh = self.alloc.alloc_extend(*args)
        if fresh is None:
            self.evict(target - req.kv_len)
            fresh = self.alloc.alloc_extend(*args)
            if fresh is None:
                return False
        self.pool.write(req.req_pool_idx, req.kv_len, fresh)
        req.kv_len = target
        return True

    def new_request(self) -> None:
        prompt = self.random_key()[:24] + [self.rng.randint(0, 3)]
        req = Req(rid=f"r{self.num_reqs}", origin_input_ids=prompt, sampling_params=SamplingParams())
        self.num_reqs += 1
        (req.req_pool_idx,) = self.pool.alloc(1)
        match = self.cache.match_prefix(prompt)
        assert as_list(match.device_indices) == self.model_slots(prompt[: self.cached_len(prompt)])
        req.prefix_indices, req.last_node = match.device_indices, match.last_node
        self.cache.inc_lock_ref(match.last_node)
        self.pool.write(req.req_pool_idx, 0, match.device_indices)
        req.kv_len = match.device_indices.numel()
        self.live.append(req)
        self.step(req)

    def step(self, req: Req) -> None:
        """A prefill chunk, or a few decoded tokens (the newest may have no KV yet)."""
        prompt_len = len(req.origin_input_ids)
        if req.kv_len < prompt_len:
            target = self.rng.randint(req.kv_len, prompt_len)
        elif len(req.all_ids()) + 3 > self.max_ctx:
            self.finish(req)
            return
        else:
            req.output_ids += [self.rng.randint(0, 3) for _ in range(self.rng.randint(1, 3))]
            target = len(req.all_ids()) - self.rng.randint(0, 1)
        if not self.grow(req, max(target, req.kv_len)):
            self.finish(req)

    def run(self, num_ops: int) -> None:
        for _ in range(num_ops):
            r = self.rng.random()
            if r < 0.22 and self.pool.available_size():
                self.new_request()
            elif r < 0.55 and self.live:
                self.step(self.rng.choice(self.live))
            elif r < 0.65 and self.live:
                self.cache_unfinished(self.rng.choice(self.live))
            elif r < 0.82 and self.live:
                self.finish(self.rng.choice(self.live))
            elif r < 0.97:
                self.evict(self.rng.randint(1, 12))
            else:
                self.flush()
            self.check()
        for req in list(self.live):
            self.finish(req)
        self.check()
        self.flush()
        assert self.cache.total_size() == 0 and self.alloc.available_size() == self.alloc.size


@pytest.mark.parametrize("page_size,pool_size,seed", [(1, 96, 0), (1, 64, 1), (4, 128, 2), (4, 96, 3)])
def test_brute_force_lifecycle(page_size: int, pool_size: int, seed: int) -> None:
    """Thousands of random lifecycle ops keep the slot partition, model, locks and sizes exact."""
    sim = LifecycleSim(seed, page_size, pool_size)
    sim.run(4000)
    assert sim.num_reqs > 300
