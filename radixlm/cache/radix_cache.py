"""RadixAttention's prefix cache: a radix tree from token-id sequences to the KV slots that hold their K/V.

Every root-to-node path spells a token sequence whose KV is resident in the pool; a node stores the tokens of
its edge (``key``) and their KV slots (``value``, same length).  Requests share a cached prefix by reading its
slots, and pin it against eviction by locking the node at its end (``lock_ref`` counts the locks passing
through a node, so a node is locked iff some request's prefix runs through it).

Slot ownership: a slot is in exactly one of {the allocator's free list, the tree, one live request}.  The tree
adopts a request's slots when the request's tokens are inserted; slots that duplicate tokens the tree already
holds are freed right there, so the tree never stores two slots for one token prefix.

With ``page_size > 1`` the tree works in whole pages: node keys are page-aligned in length, children are keyed
by their first page, and matches only ever cover whole pages.

Namespaces: KV depends on more than the tokens when a LoRA adapter modifies the projections, so the cache holds
one tree per namespace (the adapter's name; None for the base model), each with a root of its own.  A lookup
never crosses namespaces; eviction, the size counters and ``flush`` span all of them.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from radixlm.core import Req
    from radixlm.mem import ReqToTokenPool, TokenToKVPoolAllocator

__all__ = ["MatchResult", "Namespace", "RadixCache", "TreeNode"]

ChildKey = int | tuple[int, ...]
Namespace = str | None  # a LoRA adapter's name, or None for the base model


class TreeNode:
    """One edge of the radix tree together with the node it leads to.

    Invariants: ``len(key) == len(value) > 0`` for every node but a root; ``parent.children[k] is self`` where
    ``k`` is the child key of ``self.key``; ``lock_ref`` of a node is >= that of each of its children.  A root
    (one per namespace) is the only node without a parent.
    """

    __slots__ = ("id", "key", "value", "parent", "children", "lock_ref", "last_access_time")

    def __init__(self, node_id: int, key: list[int], value: torch.Tensor, parent: TreeNode | None,
                 last_access_time: int) -> None:
        self.id = node_id
        self.key = key  # token ids of this edge
        self.value = value  # [len(key)] int64 KV slots of those tokens
        self.parent = parent
        self.children: dict[ChildKey, TreeNode] = {}
        self.lock_ref = 0
        self.last_access_time = last_access_time  # a tick of the cache's monotonic counter

    def __repr__(self) -> str:
        return f"TreeNode(id={self.id}, len={len(self.key)}, lock_ref={self.lock_ref})"


@dataclass
class MatchResult:
    device_indices: torch.Tensor  # [matched_len] int64 KV slots of the matched prefix
    last_node: TreeNode  # the node whose path is exactly the matched prefix (the namespace's root for an empty match)


class RadixCache:
    """Token-id radix tree over a paged KV pool, with lock-aware LRU eviction.

    ``evictable_size() + protected_size() == total_size()`` == number of cached tokens; both counters change
    only on insert, eviction and lock transitions (0 <-> 1) and are never recomputed by walking the tree.
    """

    def __init__(self, req_to_token_pool: ReqToTokenPool, token_to_kv_pool_allocator: TokenToKVPoolAllocator,
                 page_size: int = 1, disable: bool = False) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.req_to_token_pool = req_to_token_pool
        self.token_to_kv_pool_allocator = token_to_kv_pool_allocator
        self.page_size = page_size
        self.disable = disable
        self.device = token_to_kv_pool_allocator.device
        # Both counters live across reset() so ids stay unique and access ticks stay monotonic.
        self._clock = itertools.count(1)
        self._node_ids = itertools.count()
        self.root_node = self._new_root()  # the base model's namespace (None)
        self._adapter_roots: dict[str, TreeNode] = {}  # created on first use, dropped by flush/drop_namespace
        self._evictable_size = 0
        self.num_evicted_tokens = 0  # over the cache's lifetime (a metrics counter)
        self._protected_size = 0

    # ------------------------------------------------------------------------------------------- lifecycle

    def reset(self) -> None:
        """Drop the whole tree WITHOUT freeing its slots; the caller is expected to clear the allocator too.

        The base root object survives, so requests that matched nothing (``last_node`` is the root) stay valid.
        """
        self.root_node.children = {}
        self._adapter_roots = {}
        self._evictable_size = 0
        self._protected_size = 0

    def flush(self) -> bool:
        """Free every cached slot and empty the tree, unless a node is locked (then change nothing).

        Returns True when the tree was flushed, False when some request still holds a lock.
        """
        if self._protected_size > 0:
            return False
        allocator = self.token_to_kv_pool_allocator
        allocator.free_group_begin()
        for node in self._iter_nodes():
            if node.parent is not None:
                allocator.free(node.value)
        allocator.free_group_end()
        self.reset()
        return True

    def drop_namespace(self, namespace: str) -> int:
        """Free everything cached under adapter ``namespace`` (its adapter is being unloaded: a later adapter of
        the same name must not see this KV); returns the tokens freed.  Raises RuntimeError, changing nothing,
        while a node of it is locked."""
        root = self._adapter_roots.get(namespace)
        if root is None:
            return 0
        nodes = [n for n in self._iter_nodes([root]) if n is not root]
        if any(n.lock_ref > 0 for n in nodes):
            raise RuntimeError(f"cannot drop namespace {namespace!r}: a request still holds its prefix")
        allocator = self.token_to_kv_pool_allocator
        allocator.free_group_begin()
        for node in nodes:
            allocator.free(node.value)
        allocator.free_group_end()
        del self._adapter_roots[namespace]
        freed = sum(len(n.key) for n in nodes)
        self._evictable_size -= freed
        return freed

    # ---------------------------------------------------------------------------------------- match/insert

    def match_prefix(self, key: list[int], namespace: Namespace = None) -> MatchResult:
        """Longest prefix of ``key`` cached in ``namespace`` (in whole pages when ``page_size > 1``) and the node
        ending it.

        If the match ends inside a node, that node is split so that ``last_node`` ends exactly at the match
        (slots and lock state are unchanged by the split).  Every node on the path is marked as just accessed.
        With ``disable=True`` the match is always empty and ``last_node`` is the base root.
        """
        if self.disable:
            return MatchResult(self._empty_slots(), self.root_node)
        key = key[: self._aligned(len(key))]
        node, pos, values = self.root(namespace), 0, []
        now = next(self._clock)
        while pos < len(key):
            child = node.children.get(self._child_key(key, pos))
            if child is None:
                break
            n = self._match_len(child.key, key, pos)
            if n < len(child.key):
                # The unmatched lower half keeps its old access time; the loop then ends, since the lower
                # half's first page differs from key's next one (or key is used up).
                child = self._split(child, n)
            child.last_access_time = now
            values.append(child.value)
            node, pos = child, pos + n
        slots = torch.cat(values) if values else self._empty_slots()
        return MatchResult(slots, node)

    def insert(self, key: list[int], value: torch.Tensor, namespace: Namespace = None) -> int:
        """Cache ``key`` -> ``value`` (its KV slots, ``[len(key)]``) in ``namespace`` and return how much of it
        was ALREADY cached there.

        The tree adopts ``value[already:]``; ``value[:already]`` stays the caller's, who frees whatever of it
        duplicates the tree's slots.  ``len(key)`` must be a multiple of ``page_size``.  With ``disable=True``
        nothing is inserted, 0 is returned and the caller keeps every slot.
        """
        if len(key) != value.numel():
            raise ValueError(f"key has {len(key)} tokens but value has {value.numel()} slots")
        if len(key) % self.page_size:
            raise ValueError(f"key length {len(key)} is not a multiple of page_size {self.page_size}")
        if self.disable:
            return 0
        node, pos = self.root(namespace), 0
        now = next(self._clock)
        while pos < len(key):
            child = node.children.get(self._child_key(key, pos))
            if child is None:
                break
            n = self._match_len(child.key, key, pos)
            pos += n
            if n < len(child.key) and pos < len(key):
                child = self._split(child, n)  # key diverges inside the edge: the new leaf hangs off the cut
            child.last_access_time = now
            node = child
        if pos < len(key):
            # Copy so that the caller reusing its tensor (e.g. a req_to_token row) cannot corrupt the tree.
            leaf = TreeNode(next(self._node_ids), list(key[pos:]), value[pos:].to(torch.int64, copy=True), node,
                            now)
            node.children[self._child_key(leaf.key, 0)] = leaf
            self._evictable_size += len(leaf.key)
        return pos

    # ------------------------------------------------------------------------------------------- requests

    def cache_finished_req(self, req: Req) -> None:
        """Hand a finished request's KV to the tree and release the request's lock and ``req_to_token`` row.

        Afterwards every slot the request owned is either in the tree or back in the allocator, and
        ``req.req_pool_idx`` is None.  Only the page-aligned part of the KV (up to ``req.cacheable_len``) is
        cached; the tail is freed.
        """
        allocator = self.token_to_kv_pool_allocator
        kv_slots = self._req_kv_slots(req)  # [kv_len]
        allocator.free_group_begin()
        if self.disable:
            allocator.free(kv_slots)
        else:
            aligned = self._cacheable(req)
            allocator.free(kv_slots[aligned:])
            self._insert_req_prefix(req, kv_slots[:aligned])
            self.dec_lock_ref(self._locked_node(req))
        allocator.free_group_end()
        self.req_to_token_pool.free(req.req_pool_idx)
        req.req_pool_idx = None

    def cache_unfinished_req(self, req: Req) -> None:
        """Cache what a still-running request has computed so far (chunked prefill, retraction).

        The page-aligned part of its KV (up to ``req.cacheable_len``) goes into the tree, duplicate slots are
        freed and replaced in the request's row by the tree's, and the request's lock moves to the node ending
        that part.  The rest stays owned by the request.  No-op with ``disable=True``.  Like ``cache_finished_req``
        it works in the request's adapter namespace (``req.lora_name``).
        """
        if self.disable:
            return
        kv_slots = self._req_kv_slots(req)  # [kv_len]
        aligned = self._cacheable(req)
        self.token_to_kv_pool_allocator.free_group_begin()
        self._insert_req_prefix(req, kv_slots[:aligned])
        self.token_to_kv_pool_allocator.free_group_end()
        match = self.match_prefix(req.all_ids()[:aligned], req.lora_name)
        assert match.device_indices.numel() == aligned, "a just-inserted prefix must match in full"
        old_len = req.prefix_indices.numel()
        self.req_to_token_pool.write(req.req_pool_idx, old_len, match.device_indices[old_len:])
        # Lock the new node before unlocking the old one, so the shared ancestors never pass through lock_ref 0
        # (no spurious protected -> evictable -> protected churn of the counters).
        self.inc_lock_ref(match.last_node)
        self.dec_lock_ref(self._locked_node(req))
        req.prefix_indices = match.device_indices
        req.last_node = match.last_node

    def _insert_req_prefix(self, req: Req, kv_slots: torch.Tensor) -> None:
        """Insert the request's first ``len(kv_slots)`` tokens and free its slots that the tree already had."""
        already = self.insert(req.all_ids()[: kv_slots.numel()], kv_slots, req.lora_name)
        # The locked prefix is in the tree under these very slots, so only [prefix_len, already) are duplicates.
        self.token_to_kv_pool_allocator.free(kv_slots[req.prefix_indices.numel() : already])

    def _cacheable(self, req: Req) -> int:
        """Tokens of the request's KV that may enter the tree: whole pages, and none whose id is a placeholder."""
        return self._aligned(min(req.kv_len, req.cacheable_len))

    def _req_kv_slots(self, req: Req) -> torch.Tensor:
        row = self.req_to_token_pool.req_to_token[req.req_pool_idx, : req.kv_len]
        return row.to(torch.int64)  # [kv_len]; a copy, since the row is int32

    def _locked_node(self, req: Req) -> TreeNode:
        # A request that never matched holds no lock; a root stands for "nothing locked".
        return self.root_node if req.last_node is None else req.last_node

    # ------------------------------------------------------------------------------------ locks and sizes

    def inc_lock_ref(self, node: TreeNode) -> int:
        """Lock ``node`` and its ancestors (its root excluded); returns the growth of ``protected_size()``."""
        if self.disable:
            return 0
        delta = 0
        while node.parent is not None:
            if node.lock_ref == 0:
                delta += len(node.key)
            node.lock_ref += 1
            node = node.parent
        self._evictable_size -= delta
        self._protected_size += delta
        return delta

    def dec_lock_ref(self, node: TreeNode) -> int:
        """Undo one ``inc_lock_ref(node)``; returns the change of ``protected_size()`` (<= 0)."""
        if self.disable:
            return 0
        delta = 0
        while node.parent is not None:
            if node.lock_ref <= 0:
                raise RuntimeError(f"dec_lock_ref on unlocked {node!r}")
            if node.lock_ref == 1:
                delta -= len(node.key)
            node.lock_ref -= 1
            node = node.parent
        self._evictable_size -= delta
        self._protected_size += delta
        return delta

    def evictable_size(self) -> int:
        """Cached tokens in unlocked nodes."""
        return self._evictable_size

    def protected_size(self) -> int:
        """Cached tokens in locked nodes."""
        return self._protected_size

    def total_size(self) -> int:
        """All cached tokens."""
        return self._evictable_size + self._protected_size

    # ------------------------------------------------------------------------------------------- eviction

    def evict(self, num_tokens: int) -> int:
        """Free least-recently-used unlocked leaves until ``num_tokens`` tokens are freed or none is left.

        A parent left childless and unlocked becomes a candidate in turn.  Returns the tokens evicted (may
        exceed ``num_tokens`` by up to one node, or fall short if too little is evictable).  Cost: one walk over
        the tree to collect the leaves, plus O(log n) per evicted node.
        """
        if self.disable or num_tokens <= 0:
            return 0
        # The id breaks ties between nodes accessed in the same tick, so heap entries never compare nodes.
        heap = [(n.last_access_time, n.id, n) for n in self._iter_nodes()
                if not n.children and n.lock_ref == 0 and n.parent is not None]
        heapq.heapify(heap)
        allocator = self.token_to_kv_pool_allocator
        allocator.free_group_begin()
        evicted = 0
        while evicted < num_tokens and heap:
            _, _, node = heapq.heappop(heap)
            allocator.free(node.value)
            evicted += len(node.key)
            parent = node.parent
            del parent.children[self._child_key(node.key, 0)]
            if not parent.children and parent.lock_ref == 0 and parent.parent is not None:
                heapq.heappush(heap, (parent.last_access_time, parent.id, parent))
        allocator.free_group_end()
        self._evictable_size -= evicted
        self.num_evicted_tokens += evicted
        return evicted

    # -------------------------------------------------------------------------------------------- helpers

    def pretty_print(self) -> str:
        """One line per node, indented by depth: id, key (abbreviated), slots, lock_ref, last access."""
        lines = [f"RadixCache(total={self.total_size()}, evictable={self._evictable_size}, "
                 f"protected={self._protected_size}, page_size={self.page_size})"]

        def show(seq: list[int]) -> str:
            return str(seq) if len(seq) <= 8 else f"{seq[:8]}...(+{len(seq) - 8})"

        for namespace, root in [(None, self.root_node), *self._adapter_roots.items()]:
            if namespace is not None:
                lines.append(f"namespace {namespace!r}:")
            stack: list[tuple[TreeNode, int]] = [(c, 1) for c in reversed(root.children.values())]
            while stack:
                node, depth = stack.pop()
                lines.append(f"{'  ' * depth}#{node.id} key={show(node.key)} slots={show(node.value.tolist())} "
                             f"lock={node.lock_ref} t={node.last_access_time}")
                stack.extend((c, depth + 1) for c in reversed(node.children.values()))
        return "\n".join(lines)

    def root(self, namespace: Namespace) -> TreeNode:
        """The root of ``namespace``'s tree (created empty on first use)."""
        if namespace is None:
            return self.root_node
        root = self._adapter_roots.get(namespace)
        if root is None:
            root = self._adapter_roots[namespace] = self._new_root()
        return root

    def namespaces(self) -> list[Namespace]:
        """The namespaces that have a root: None first, then adapters in order of first use."""
        return [None, *self._adapter_roots]

    def _new_root(self) -> TreeNode:
        return TreeNode(next(self._node_ids), [], self._empty_slots(), None, next(self._clock))

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Cut ``child``'s edge after ``n`` tokens (0 < n < len, page-aligned); returns the new upper node.

        The upper node inherits the lock count and access time: every lock through ``child`` also runs
        through its upper half, and the two halves were last used together.
        """
        parent = child.parent
        upper = TreeNode(next(self._node_ids), child.key[:n], child.value[:n], parent, child.last_access_time)
        upper.lock_ref = child.lock_ref
        child.key, child.value, child.parent = child.key[n:], child.value[n:], upper
        upper.children[self._child_key(child.key, 0)] = child
        parent.children[self._child_key(upper.key, 0)] = upper
        return upper

    def _child_key(self, key: list[int], pos: int) -> ChildKey:
        if self.page_size == 1:
            return key[pos]
        return tuple(key[pos : pos + self.page_size])

    def _match_len(self, node_key: list[int], key: list[int], pos: int) -> int:
        """Length of the common prefix of ``node_key`` and ``key[pos:]``, rounded down to whole pages."""
        if key[pos : pos + len(node_key)] == node_key:
            return len(node_key)  # the common case (a whole edge matches) at C speed, not token by token
        n = 0
        for a, b in zip(node_key, itertools.islice(key, pos, None)):
            if a != b:
                break
            n += 1
        return self._aligned(n)

    def _aligned(self, n: int) -> int:
        return n - n % self.page_size

    def _empty_slots(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.int64, device=self.device)

    def _iter_nodes(self, roots: list[TreeNode] | None = None) -> Iterator[TreeNode]:
        """Every node under ``roots`` (default: every namespace's), the roots included (pre-order)."""
        stack = [self.root_node, *self._adapter_roots.values()] if roots is None else list(roots)
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())
