"""Property-based tests (hypothesis) for the radix prefix cache.

Complements the seeded brute-force lifecycle in ``test_radix_cache.py``: here hypothesis picks the operations, so
a failure shrinks to a minimal sequence of request lifecycle steps.

* ``RadixLifecycleMachine`` (page_size 1) and ``PagedRadixLifecycleMachine`` (page_size 4) drive the real
  ``RadixCache`` + ``TokenToKVPoolAllocator`` + ``ReqToTokenPool`` like the scheduler does: admit a request
  (match ``all_ids()[:-1]``, lock, take a row, allocate the uncached part -- evicting first if short), prefill
  chunks followed by ``cache_unfinished_req``, decode steps, ``cache_finished_req``, retraction and re-admission,
  ``evict``, ``flush``, ``reset``, ``drop_namespace``, locks held outside any request, and speculative steps
  whose rejected draft tokens' KV is rolled back.  Requests run under a namespace (a LoRA adapter, or None for
  the base model).  After every step the invariants check the slot partition, the size counters, lock counts,
  that locked prefixes survive, and -- through a shadow of the KV buffer that records which namespace and token
  prefix each slot's KV was computed for -- that every slot the tree or a request reads holds the KV of exactly
  the tokens AND the adapter it stands for (KV is never shared across namespaces).
* Two ``@given`` tests check ``insert``/``match_prefix`` against brute force over plain token sequences.

Needs ``hypothesis`` (add it to the ``test`` extra of pyproject.toml).
"""

from __future__ import annotations

import sys
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from radixlm.cache import RadixCache, TreeNode
from radixlm.core import Req, SamplingParams
from radixlm.mem import release_kv_tail
from test_radix_cache import make_cache, path_key

SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True, report_multiple_bugs=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ALPHABET = 3  # token ids 0..2: short random sequences share prefixes often

# A token sequence: (which earlier sequence to start from, how much of it to keep, fresh tokens to append).
seq_specs = st.tuples(st.integers(0, 7), st.integers(0, 40), st.lists(st.integers(0, ALPHABET - 1), max_size=12))
picks = st.integers(0, 15)  # chooses among the live requests / external locks, modulo their number
namespaces = st.sampled_from([None, None, "a", "b"])  # the base model and two adapters


def aligned(n: int, p: int) -> int:
    return n - n % p


def walk_match(cache: RadixCache, key: list[int], namespace: str | None = None) -> list[int]:
    """Slots of the longest whole-page prefix of ``key`` cached in ``namespace``, found without touching the tree
    (no split, no access-time update): an independent reimplementation of ``match_prefix``'s result."""
    p = cache.page_size
    key = key[: aligned(len(key), p)]
    node, pos, out = cache.root(namespace), 0, []
    while pos < len(key):
        child = node.children.get(key[pos] if p == 1 else tuple(key[pos : pos + p]))
        if child is None:
            break
        n = 0
        while n < len(child.key) and pos + n < len(key) and child.key[n] == key[pos + n]:
            n += 1
        n = aligned(n, p)
        out += child.value[:n].tolist()
        pos += n
        if n < len(child.key):
            break
        node = child
    return out


def tree_nodes(cache: RadixCache) -> list[tuple[TreeNode, str | None, tuple[int, ...]]]:
    """Every non-root node of every namespace with its namespace and the tokens spelled by the path from its
    root to its parent."""
    out, stack = [], [(cache.root(ns), ns, ()) for ns in cache.namespaces()]
    while stack:
        node, ns, path = stack.pop()
        for child in node.children.values():
            out.append((child, ns, path))
            stack.append((child, ns, path + tuple(child.key)))
    return out


def tree_map(cache: RadixCache) -> dict[tuple[str | None, tuple[int, ...]], tuple[int, ...]]:
    """(namespace, whole-page token prefix) -> KV slots of its last page, for every cached page."""
    p = cache.page_size
    return {(ns, path + tuple(node.key[: i + p])): tuple(node.value[i : i + p].tolist())
            for node, ns, path in tree_nodes(cache) for i in range(0, len(node.key), p)}


# ------------------------------------------------------------------------------------------ stateful lifecycle


class RadixLifecycleMachine(RuleBasedStateMachine):
    PAGE_SIZE = 1
    POOL_SIZE = 40  # tokens; small enough that admission has to evict regularly
    ROWS = 4
    MAX_CTX = 32

    def __init__(self) -> None:
        super().__init__()
        self.p = self.PAGE_SIZE
        self.cache, self.alloc, self.pool = make_cache(self.POOL_SIZE, self.PAGE_SIZE, self.ROWS, self.MAX_CTX)
        self.live: list[Req] = []
        self.waiting: list[Req] = []  # retracted requests (outputs kept), to be admitted again
        # (node, its namespace, its path tokens, its slots)
        self.ext_locks: list[tuple[TreeNode, str | None, list[int], list[int]]] = []
        self.history: list[list[int]] = [[]]  # sequences seen so far, to build prompts that share prefixes
        # shadow KV buffer: slot -> (namespace, token prefix) its KV was computed for
        self.kv: dict[int, tuple[str | None, tuple[int, ...]]] = {}
        self.num_reqs = 0

    # ------------------------------------------------------------------------------------------ helpers

    def make_key(self, spec: tuple[int, int, list[int]]) -> list[int]:
        back, cut, fresh = spec
        base = self.history[-1 - back % len(self.history)]
        return (base[:cut] + fresh)[: self.MAX_CTX - 4]

    def row(self, req: Req) -> list[int]:
        return self.pool.req_to_token[req.req_pool_idx, : req.kv_len].tolist()

    def pick(self, reqs: list[Req], i: int) -> Req:
        return reqs[i % len(reqs)]

    def prefill_pending(self) -> list[Req]:
        return [r for r in self.live if r.kv_len < len(r.origin_input_ids)]

    def decodable(self) -> list[Req]:
        return [r for r in self.live if r.kv_len >= len(r.origin_input_ids) and r.seq_len + 3 <= self.MAX_CTX]

    def grow(self, req: Req, target: int) -> bool:
        """Allocate KV for positions ``kv_len .. target - 1`` (evicting if short), write the row and the shadow
        KV.  Returns False, changing nothing but the cache, if memory cannot be found."""
        if target <= req.kv_len:
            return True
        args = ([req.kv_len], [target], [self.row(req)[-1] if req.kv_len else 0])
        fresh = self.alloc.alloc_extend(*args)
        if fresh is None:
            pages = -(-target // self.p) - -(-req.kv_len // self.p)
            short = pages * self.p - self.alloc.available_size()
            assert short > 0
            evictable = self.cache.evictable_size()
            evicted = self.cache.evict(short)
            assert min(short, evictable) <= evicted <= evictable
            self.check_locked_prefixes()  # no locked node was evicted (``req`` is already in ``live``)
            fresh = self.alloc.alloc_extend(*args)
            if fresh is None:
                assert evicted < short and self.cache.evictable_size() == 0
                return False
        assert fresh.numel() == target - req.kv_len
        self.pool.write(req.req_pool_idx, req.kv_len, fresh)
        ids = req.all_ids()
        for pos, slot in enumerate(fresh.tolist(), start=req.kv_len):
            self.kv[slot] = (req.lora_name, tuple(ids[: pos + 1]))
        req.kv_len = target
        return True

    def tree_slots(self, tokens: list[int], namespace: str | None) -> list[int]:
        got = walk_match(self.cache, tokens, namespace)
        assert len(got) == len(tokens), "tokens expected to be cached in full"
        return got

    # -------------------------------------------------------------------------------------------- rules

    @initialize(warmup=st.lists(st.tuples(seq_specs, namespaces, st.integers(1, 4)), max_size=4))
    def warm_up(self, warmup) -> None:
        """Start from a populated tree: run a few requests to completion (prefill plus some decoded tokens)."""
        for spec, ns, num_out in warmup:
            self.admit(spec, ns, readmit=False, use_cache=1, chunk=40)
            if self.live and self.live[-1].rid == f"r{self.num_reqs - 1}":
                req = self.live[-1]
                req.output_ids += [t % ALPHABET for t in range(num_out)]
                self.grow(req, req.seq_len - 1)
                self.finish(len(self.live) - 1, retract=False)

    @precondition(lambda self: self.pool.available_size() > 0)
    @rule(spec=seq_specs, ns=namespaces, readmit=st.booleans(), use_cache=st.integers(0, 4),
          chunk=st.integers(1, 16))
    def admit(self, spec, ns: str | None, readmit: bool, use_cache: int, chunk: int) -> None:
        """Admit a new (or a retracted) request of adapter ``ns`` and run its first prefill chunk; skip it if
        memory is short."""
        if readmit and self.waiting:
            req = self.waiting.pop(0)
        else:
            prompt = self.make_key(spec) or [spec[0] % ALPHABET]
            req = Req(rid=f"r{self.num_reqs}", origin_input_ids=prompt, sampling_params=SamplingParams(),
                      lora_name=ns)
            self.num_reqs += 1
        (req.req_pool_idx,) = self.pool.alloc(1)
        if use_cache:  # 1 in 5 requests computes everything itself (its duplicates are freed on insert)
            match = self.cache.match_prefix(req.all_ids()[:-1], req.lora_name)
            n = match.device_indices.numel()
            assert n % self.p == 0
            assert match.device_indices.tolist() == walk_match(self.cache, req.all_ids()[:n], req.lora_name)
            assert path_key(match.last_node) == req.all_ids()[:n]
            before = self.cache.protected_size()
            delta = self.cache.inc_lock_ref(match.last_node)
            assert self.cache.protected_size() == before + delta
            req.prefix_indices, req.last_node = match.device_indices, match.last_node
            self.pool.write(req.req_pool_idx, 0, match.device_indices)
            req.kv_len = n
        self.live.append(req)
        if not self.grow(req, min(req.kv_len + chunk, req.seq_len)):
            self.live.remove(req)  # not admitted after all
            if req.last_node is not None:
                self.cache.dec_lock_ref(req.last_node)
            self.pool.free(req.req_pool_idx)
            req.reset_for_retraction()
            return
        self.history.append(req.all_ids())
        if req.kv_len < req.seq_len:
            self.cache_unfinished(req)

    @precondition(lambda self: self.prefill_pending())
    @rule(i=picks, chunk=st.integers(1, 16))
    def prefill_chunk(self, i: int, chunk: int) -> None:
        req = self.pick(self.prefill_pending(), i)
        if self.grow(req, min(req.kv_len + chunk, len(req.origin_input_ids))) and req.kv_len < req.seq_len:
            self.cache_unfinished(req)

    @precondition(lambda self: self.decodable())
    @rule(i=picks, tokens=st.lists(st.integers(0, ALPHABET - 1), min_size=1, max_size=3), lag=st.booleans())
    def decode(self, i: int, tokens: list[int], lag: bool) -> None:
        """Sample a few tokens; KV is computed for all of them but (with ``lag``) the newest."""
        req = self.pick(self.decodable(), i)
        req.output_ids += tokens
        if not self.grow(req, req.seq_len - lag):
            del req.output_ids[-len(tokens) :]  # no memory: the step did not happen

    @precondition(lambda self: self.decodable())
    @rule(i=picks, drafts=st.lists(st.integers(0, ALPHABET - 1), min_size=1, max_size=3), accept=st.integers(0, 3))
    def speculate(self, i: int, drafts: list[int], accept: int) -> None:
        """Verify draft tokens: KV is computed for all of them, then the rejected ones are rolled back with
        ``release_kv_tail`` (whole pages of rejected positions freed, a partly kept page kept) and the request
        keeps the accepted tokens."""
        req = self.pick(self.decodable(), i)
        kept_outputs = len(req.output_ids)
        req.output_ids += drafts
        if not self.grow(req, req.seq_len):
            del req.output_ids[kept_outputs:]  # no memory: the step did not happen
            return
        accept = min(accept, len(drafts))
        keep, kv_len = req.seq_len - len(drafts) + accept, req.kv_len
        assert keep >= req.prefix_indices.numel()  # never into the cached, locked prefix
        free_before, row = self.alloc.available_size(), self.row(req)
        release_kv_tail(self.pool, self.alloc, req.req_pool_idx, keep, kv_len)
        assert self.alloc.available_size() == free_before + (-(-kv_len // self.p) - -(-keep // self.p)) * self.p
        del req.output_ids[kept_outputs + accept :]
        req.kv_len = keep
        assert self.row(req) == row[:keep]

    @precondition(lambda self: self.live)
    @rule(i=picks)
    def cache_unfinished_rule(self, i: int) -> None:
        self.cache_unfinished(self.pick(self.live, i))

    def cache_unfinished(self, req: Req) -> None:
        tokens, row, old_prefix, ns = req.all_ids(), self.row(req), req.prefix_indices.numel(), req.lora_name
        a = aligned(req.kv_len, self.p)
        already = len(walk_match(self.cache, tokens[:a], ns))
        assert already >= old_prefix
        expected = walk_match(self.cache, tokens[:already], ns) + row[already:a]
        free_before = self.alloc.available_size()
        self.cache.cache_unfinished_req(req)
        assert req.prefix_indices.tolist() == expected == self.tree_slots(tokens[:a], ns)
        assert self.row(req) == expected + row[a:]  # duplicates replaced by the tree's slots, the tail kept
        assert path_key(req.last_node) == tokens[:a]
        assert req.last_node.lock_ref > 0 or (a == 0 and req.last_node is self.cache.root(ns))
        assert self.alloc.available_size() == free_before + already - old_prefix

    @precondition(lambda self: self.live)
    @rule(i=picks, retract=st.booleans())
    def finish(self, i: int, retract: bool) -> None:
        """Finish the request, or retract it (its KV goes to the cache and it waits to be admitted again)."""
        req = self.pick(self.live, i)
        tokens, row, prefix_len, kv_len = req.all_ids(), self.row(req), req.prefix_indices.numel(), req.kv_len
        ns = req.lora_name
        a = aligned(kv_len, self.p)
        already = len(walk_match(self.cache, tokens[:a], ns))
        assert already >= prefix_len
        expected = walk_match(self.cache, tokens[:already], ns) + row[already:a]
        free_before, rows_before = self.alloc.available_size(), self.pool.available_size()
        self.cache.cache_finished_req(req)
        self.live.remove(req)
        assert req.req_pool_idx is None and self.pool.available_size() == rows_before + 1
        assert self.tree_slots(tokens[:a], ns) == expected
        tail = self.p if kv_len > a else 0
        assert self.alloc.available_size() == free_before + already - prefix_len + tail
        self.history.append(tokens)
        if retract and req.seq_len < self.MAX_CTX - 4:
            req.reset_for_retraction()
            self.waiting.append(req)

    @rule(n=st.integers(1, 20))
    def evict(self, n: int) -> None:
        free_before, evictable, protected = (self.alloc.available_size(), self.cache.evictable_size(),
                                             self.cache.protected_size())
        before = tree_map(self.cache)
        nodes_before = {node.id: node for node, _, _ in tree_nodes(self.cache)}
        evicted = self.cache.evict(n)
        assert evicted % self.p == 0
        assert min(n, evictable) <= evicted <= evictable
        assert self.alloc.available_size() == free_before + evicted
        assert self.cache.protected_size() == protected
        after = tree_map(self.cache)
        assert (len(before) - len(after)) * self.p == evicted and after.items() <= before.items()
        # Least recently used first: nothing evicted is newer than an unlocked leaf that stays.
        remaining = tree_nodes(self.cache)
        gone = nodes_before.keys() - {node.id for node, _, _ in remaining}
        assert all(nodes_before[i].lock_ref == 0 for i in gone)
        if gone:  # overshoots n by less than one node
            assert evicted - max(len(nodes_before[i].key) for i in gone) < n
            newest_gone = max(nodes_before[i].last_access_time for i in gone)
            assert all(node.last_access_time >= newest_gone
                       for node, _, _ in remaining if not node.children and node.lock_ref == 0)

    @rule()
    def flush(self) -> None:
        free_before, total, protected = (self.alloc.available_size(), self.cache.total_size(),
                                         self.cache.protected_size())
        flushed = self.cache.flush()
        assert flushed == (protected == 0)
        if flushed:
            assert self.cache.total_size() == 0 and self.cache.namespaces() == [None]
            assert not self.cache.root_node.children
            assert self.alloc.available_size() == free_before + total
        else:
            assert self.cache.total_size() == total

    @precondition(lambda self: not self.live and not self.ext_locks)
    @rule()
    def reset(self) -> None:
        """Drop the tree without freeing, then clear the allocator (the documented contract)."""
        self.cache.reset()
        self.alloc.clear()
        assert self.cache.total_size() == 0 and self.alloc.available_size() == self.POOL_SIZE

    @rule(ns=st.sampled_from(["a", "b"]))
    def drop_namespace(self, ns: str) -> None:
        """Drop an adapter's tree (its adapter is unloaded): refused while a node of it is locked; else its
        every page is freed and the other namespaces are untouched."""
        before, free_before = tree_map(self.cache), self.alloc.available_size()
        locked = any(n.lock_ref > 0 for n, node_ns, _ in tree_nodes(self.cache) if node_ns == ns)
        if locked:
            with pytest.raises(RuntimeError, match=f"cannot drop namespace '{ns}'"):
                self.cache.drop_namespace(ns)
            assert tree_map(self.cache) == before
            return
        freed = self.cache.drop_namespace(ns)
        kept = {k: v for k, v in before.items() if k[0] != ns}
        assert tree_map(self.cache) == kept and freed == (len(before) - len(kept)) * self.p
        assert self.alloc.available_size() == free_before + freed
        assert ns not in self.cache.namespaces()
        for req in self.live:
            if req.lora_name == ns and req.last_node is not None:
                req.last_node = None  # it matched nothing (the dropped root): nothing it holds is locked

    @precondition(lambda self: len(self.ext_locks) < 4)
    @rule(spec=seq_specs, ns=namespaces)
    def lock_external(self, spec, ns: str | None) -> None:
        key = self.make_key(spec)
        match = self.cache.match_prefix(key, ns)
        n = match.device_indices.numel()
        before = self.cache.protected_size()
        delta = self.cache.inc_lock_ref(match.last_node)
        assert delta >= 0 and self.cache.protected_size() == before + delta
        self.ext_locks.append((match.last_node, ns, key[:n], match.device_indices.tolist()))

    @precondition(lambda self: self.ext_locks)
    @rule(i=picks)
    def unlock_external(self, i: int) -> None:
        node, _, _, _ = self.ext_locks.pop(i % len(self.ext_locks))
        before = self.cache.protected_size()
        delta = self.cache.dec_lock_ref(node)
        assert delta <= 0 and self.cache.protected_size() == before + delta

    @rule(spec=seq_specs, ns=namespaces)
    def probe_match(self, spec, ns: str | None) -> None:
        """match_prefix == the pure walk; its split leaves the token -> slot map unchanged."""
        key = self.make_key(spec)
        before, expected = tree_map(self.cache), walk_match(self.cache, key, ns)
        match = self.cache.match_prefix(key, ns)
        assert match.device_indices.tolist() == expected and len(expected) % self.p == 0
        assert path_key(match.last_node) == key[: len(expected)]
        assert tree_map(self.cache) == before

    # ------------------------------------------------------------------------------------- invariants

    @invariant()
    def tree_structure_and_sizes(self) -> None:
        walked = [0, 0]  # tokens in [unlocked, locked] nodes
        for node, ns, _ in tree_nodes(self.cache):
            parent = node.parent
            assert len(node.key) == node.value.numel() > 0 and len(node.key) % self.p == 0
            assert parent.children[node.key[0] if self.p == 1 else tuple(node.key[: self.p])] is node
            if parent is not self.cache.root(ns):  # a path is locked and touched as a whole
                assert parent.lock_ref >= node.lock_ref and parent.last_access_time >= node.last_access_time
            assert node.lock_ref >= 0
            vals = node.value.tolist()
            for j in range(0, len(vals), self.p):  # whole pages, each slot at its offset in its page
                assert vals[j : j + self.p] == list(range(vals[j], vals[j] + self.p)) and vals[j] % self.p == 0
            walked[node.lock_ref > 0] += len(node.key)
        assert self.cache.evictable_size() == walked[0]
        assert self.cache.protected_size() == walked[1]
        assert self.cache.total_size() == sum(walked)

    @invariant()
    def slot_partition(self) -> None:
        """Every page is exactly once free, in the tree, or owned by a live request beyond its prefix."""
        n = self.alloc.available_size()
        free = self.alloc.alloc(n)  # read the free list through the public API, then put it back as it was
        assert free is not None and free.numel() == n
        self.alloc.free(free)
        owners: Counter[int] = Counter(s // self.p for s in free[:: self.p].tolist())
        for node, _, _ in tree_nodes(self.cache):
            owners.update(s // self.p for s in node.value.tolist()[:: self.p])
        for req in self.live:
            owners.update({s // self.p for s in self.row(req)[req.prefix_indices.numel() :]})
        assert sum(owners.values()) == self.alloc.num_pages, f"lost or double-owned pages: {owners}"
        assert set(owners) == set(range(1, self.alloc.num_pages + 1))

    @invariant()
    def locked_prefixes_intact(self) -> None:
        self.check_locked_prefixes()
        for req in self.live:
            # Another request may have cached a longer prefix, never a shorter one.
            prefix_len = req.prefix_indices.numel()
            got = self.cache.match_prefix(req.all_ids(), req.lora_name).device_indices
            assert got.numel() >= prefix_len and got.numel() % self.p == 0
            assert got[:prefix_len].tolist() == req.prefix_indices.tolist()

    def check_locked_prefixes(self) -> None:
        for req in self.live:
            tokens, prefix_len = req.all_ids(), req.prefix_indices.numel()
            assert prefix_len % self.p == 0 and prefix_len <= req.kv_len
            assert (self.row(req)[:prefix_len] == req.prefix_indices.tolist()
                    == self.tree_slots(tokens[:prefix_len], req.lora_name))
            if req.last_node is not None:
                assert path_key(req.last_node) == tokens[:prefix_len]
            # Every slot the request reads holds the KV of exactly its tokens up to that position, under its adapter.
            for pos, slot in enumerate(self.row(req)):
                assert self.kv.get(slot) == (req.lora_name, tuple(tokens[: pos + 1])), f"{req.rid} pos {pos}"
        for node, ns, tokens, slots in self.ext_locks:
            assert path_key(node) == tokens and self.tree_slots(tokens, ns) == slots

    @invariant()
    def lock_refs_and_cached_kv(self) -> None:
        expected: Counter[int] = Counter()
        locks = [r.last_node for r in self.live if r.last_node is not None] + [n for n, _, _, _ in self.ext_locks]
        for node in locks:
            while node.parent is not None:
                expected[node.id] += 1
                node = node.parent
        for node, ns, path in tree_nodes(self.cache):
            assert node.lock_ref == expected[node.id], f"{node!r}: expected lock_ref {expected[node.id]}"
            full = path + tuple(node.key)
            for j, slot in enumerate(node.value.tolist()):
                assert self.kv.get(slot) == (ns, full[: len(path) + j + 1]), f"tree slot {slot} holds foreign KV"

    def teardown(self) -> None:
        """Release everything; the pool must then be whole again.  Skipped after a failed step (hypothesis runs
        teardown in a ``finally``), so that a broken state does not add a second, different error."""
        if sys.exc_info()[1] is not None:
            return
        for req in list(self.live):
            self.cache.cache_finished_req(req)
        self.live.clear()
        while self.ext_locks:
            self.cache.dec_lock_ref(self.ext_locks.pop()[0])
        assert self.cache.protected_size() == 0
        assert self.cache.flush() and self.cache.total_size() == 0
        assert self.alloc.available_size() == self.POOL_SIZE and self.pool.available_size() == self.ROWS


class PagedRadixLifecycleMachine(RadixLifecycleMachine):
    PAGE_SIZE = 4
    POOL_SIZE = 64  # 16 pages


TestRadixLifecycle = RadixLifecycleMachine.TestCase
TestRadixLifecycle.settings = settings(max_examples=300, stateful_step_count=30, **SETTINGS)
TestPagedRadixLifecycle = PagedRadixLifecycleMachine.TestCase
TestPagedRadixLifecycle.settings = settings(max_examples=300, stateful_step_count=30, **SETTINGS)


# ------------------------------------------------------------------------------------- plain insert/match


token_seqs = st.lists(st.integers(0, ALPHABET - 1), max_size=14)


def first_slots(first: dict[tuple[int, ...], list[int]], key: list[int], p: int) -> list[int]:
    return [s for i in range(0, len(key), p) for s in first[tuple(key[: i + p])]]


@pytest.mark.parametrize("page_size", [1, 2, 4])
@settings(max_examples=150, **SETTINGS)
@given(seqs=st.lists(token_seqs, min_size=1, max_size=10), queries=st.lists(token_seqs, max_size=6))
def test_inserted_sequences_match_their_slots(page_size: int, seqs: list[list[int]],
                                               queries: list[list[int]]) -> None:
    """Insert sequences with distinct fresh slots; each then matches in full, with the slots of whoever first
    inserted each of its pages, and any query matches its longest inserted whole-page prefix."""
    cache, _, _ = make_cache(size=4096, page_size=page_size)
    first: dict[tuple[int, ...], list[int]] = {}  # whole-page prefix -> slots of its last page, first insert wins
    next_slot = 1000
    for seq in seqs:
        seq = seq[: aligned(len(seq), page_size)]
        value = torch.arange(next_slot, next_slot + len(seq), dtype=torch.int64)
        next_slot += len(seq)
        cache.insert(seq, value)
        for i in range(0, len(seq), page_size):
            first.setdefault(tuple(seq[: i + page_size]), value[i : i + page_size].tolist())
        value.fill_(-1)  # the tree keeps its own copy
    for seq in seqs:
        seq = seq[: aligned(len(seq), page_size)]
        assert cache.match_prefix(seq).device_indices.tolist() == first_slots(first, seq, page_size)
    for q in queries + [s + q for s in seqs for q in queries[:1]]:
        n = 0
        while n + page_size <= len(q) and tuple(q[: n + page_size]) in first:
            n += page_size
        match = cache.match_prefix(q)
        assert match.device_indices.tolist() == first_slots(first, q[:n], page_size)
        assert path_key(match.last_node) == q[:n]
    assert cache.total_size() == len(first) * page_size == cache.evictable_size()


@pytest.mark.parametrize("page_size", [1, 2, 4])
@settings(max_examples=150, **SETTINGS)
@given(ops=st.lists(st.tuples(st.booleans(), token_seqs), min_size=1, max_size=14))
def test_insert_returns_longest_common_prefix_with_earlier_keys(page_size: int,
                                                               ops: list[tuple[bool, list[int]]]) -> None:
    """``insert`` returns the whole-page longest common prefix with any earlier key, also after matches have
    split nodes at arbitrary page boundaries."""
    cache, _, _ = make_cache(size=4096, page_size=page_size)
    inserted: list[list[int]] = []
    next_slot = 1000
    for is_insert, key in ops:
        key = key[: aligned(len(key), page_size)]
        if not is_insert:
            cache.match_prefix(key)  # may split a node
            continue
        lcp = 0
        for prev in inserted:
            n = 0
            while n < min(len(prev), len(key)) and prev[n] == key[n]:
                n += 1
            lcp = max(lcp, aligned(n, page_size))
        assert cache.insert(key, torch.arange(next_slot, next_slot + len(key), dtype=torch.int64)) == lcp
        next_slot += len(key)
        inserted.append(key)
        prefixes = {tuple(k[: i + page_size]) for k in inserted for i in range(0, len(k), page_size)}
        assert cache.total_size() == len(prefixes) * page_size
