"""The cache-aware router's view of every worker's prefix cache: a character-level compressed radix tree over
request text, shared by all workers, with per-worker ownership and last-access times.

A worker *owns* a node when some text it was sent (and not yet evicted) runs through the node's whole edge.
Ownership is prefix-closed: a worker that owns a node owns every ancestor (the root excluded: it has an empty
edge and no owners).  All characters of one edge therefore share one owner set and one access time per owner,
which is why inserting a text that ends inside an edge splits the edge there.

Size of a worker = the sum of the edge lengths of the nodes it owns = the number of distinct non-empty prefixes
(in Unicode code points) of the texts it still owns.  Kept incrementally, read in O(1).

Eviction is LRU, leaf-first, per worker: a node is evictable for a worker when the worker owns none of its
children.  Because an insert touches its whole path with one ``now`` and ``now`` never decreases, a node's
access time is >= each of its children's, so leaf-first order and global LRU order agree (ties: leaves first).
Each worker has a min-heap of ``(time, seq, node)`` candidates with lazy invalidation: an entry is live iff the
worker still owns the node at exactly that time and owns none of its children; the heap is compacted once stale
entries outnumber the worker's nodes, so its length stays O(the worker's nodes).

Concurrency contract: single-threaded, e.g. called only from the router's asyncio loop (no locks).  Eviction
runs in bounded slices (``budget`` heap pops per call) so a timer task can interleave it with routing.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["EvictStats", "MatchResult", "PrefixTree", "TreeNode"]

# Compact a worker's heap when it holds more than this factor times its node count plus the slack.
_HEAP_COMPACT_FACTOR = 2
_HEAP_COMPACT_SLACK = 64


class TreeNode:
    """One edge of the tree and the node it leads to.

    Invariants: ``edge`` is non-empty for every node but the root; ``parent.children[edge[0]] is self``;
    ``owners`` is non-empty for every node but the root and is a subset of the parent's (root excluded);
    ``child_owners[w]`` = the number of children that ``w`` owns (absent when 0).
    """

    __slots__ = ("edge", "parent", "children", "owners", "child_owners")

    def __init__(self, edge: str, parent: TreeNode | None) -> None:
        self.edge = edge
        self.parent = parent
        self.children: dict[str, TreeNode] = {}  # first character of the child's edge -> child
        self.owners: dict[str, float] = {}  # worker -> last access time
        self.child_owners: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"TreeNode(edge={self.edge!r}, owners={self.owners})"


@dataclass(frozen=True)
class MatchResult:
    """``matched``: the length (code points) of the longest prefix of the text that some (allowed) worker owns;
    ``worker``: among the workers owning the node where that prefix ends, the most recently used one (ties: the
    smallest name); ``None`` when nothing matched."""

    matched: int
    worker: str | None


class EvictStats(NamedTuple):
    chars: int  # characters of ownership dropped
    pops: int  # heap entries popped, live or stale (what a budget counts)


def _common_prefix_len(edge: str, text: str, pos: int) -> int:
    """The length of the common prefix of ``edge`` and ``text[pos:]``."""
    if text.startswith(edge, pos):
        return len(edge)
    n = min(len(edge), len(text) - pos)
    i = 0
    while i < n and edge[i] == text[pos + i]:
        i += 1
    return i


class PrefixTree:
    """The shared tree.  Times (``now``) are passed in by the caller, so tests are deterministic; across calls
    they must never decrease (the router passes ``time.monotonic()``)."""

    def __init__(self) -> None:
        self.root = TreeNode("", None)
        self._sizes: dict[str, int] = {}  # worker -> characters owned
        self._node_counts: dict[str, int] = {}  # worker -> nodes owned (bounds its heap's length)
        self._heaps: dict[str, list[tuple[float, int, TreeNode]]] = {}
        self._seq = itertools.count()  # heap tie-breaker, so nodes are never compared

    # ---- reads -------------------------------------------------------------------------------------------------

    def size(self, worker: str) -> int:
        """Characters ``worker`` owns (0 for an unknown worker).  O(1)."""
        return self._sizes.get(worker, 0)

    def workers(self) -> list[str]:
        """Workers owning at least one node."""
        return [w for w, s in self._sizes.items() if s > 0]

    def iter_nodes(self) -> Iterator[tuple[str, TreeNode]]:
        """Every non-root node with the text its path spells (depth-first).  O(tree); for tests and debugging."""
        stack = [("", self.root)]
        while stack:
            prefix, node = stack.pop()
            for child in node.children.values():
                path = prefix + child.edge
                yield path, child
                stack.append((path, child))

    def match(self, text: str, workers: Collection[str] | None = None) -> MatchResult:
        """The longest prefix of ``text`` owned by a worker (by one of ``workers`` when given).  Read-only (no
        access time changes: the router inserts the text for the worker it picks).  O(len(text) + depth *
        owners of a node) with ``workers``, O(len(text)) without."""
        node, pos, best = self.root, 0, self.root
        matched = 0
        while pos < len(text):
            child = node.children.get(text[pos])
            if child is None or (workers is not None and not any(w in workers for w in child.owners)):
                break
            k = _common_prefix_len(child.edge, text, pos)
            best, matched = child, pos + k
            if k < len(child.edge):
                break
            node, pos = child, pos + k
        if best is self.root:
            return MatchResult(0, None)
        candidates = best.owners if workers is None else {w: t for w, t in best.owners.items() if w in workers}
        return MatchResult(matched, min(candidates, key=lambda w: (-candidates[w], w)))

    # ---- writes ------------------------------------------------------------------------------------------------

    def insert(self, text: str, worker: str, now: float) -> None:
        """Make ``worker`` own every prefix of ``text``, all touched at ``now``; split edges where ``text``
        diverges from or ends inside one.  O(len(text)) plus O(log) for one heap push."""
        node, pos = self.root, 0
        while pos < len(text):
            child = node.children.get(text[pos])
            if child is None:
                child = TreeNode(text[pos:], node)
                node.children[text[pos]] = child
                k = len(child.edge)
            else:
                k = _common_prefix_len(child.edge, text, pos)
                if k < len(child.edge):
                    child = self._split(child, k)
            self._own(child, worker, now)
            node, pos = child, pos + k
        if node is not self.root and node.child_owners.get(worker, 0) == 0:
            self._push(worker, node, now)

    def evict(self, worker: str, max_size: int, budget: int | None = None) -> EvictStats:
        """Drop ``worker``'s least recently used leaf-most ownership until its size is <= ``max_size``, or
        ``budget`` heap entries (live or stale) were popped; the caller calls again while ``size(worker) >
        max_size``.  Nodes left without owners are deleted, and a node left with one child of identical ownership
        (times included) is merged into it.  O(popped * log(heap) + characters of merged edges), never a scan."""
        heap = self._heaps.get(worker)
        evicted = pops = 0
        while heap and self._sizes[worker] > max_size and (budget is None or pops < budget):
            time, _, node = heapq.heappop(heap)
            pops += 1
            if node.owners.get(worker) != time or node.child_owners.get(worker, 0):
                continue  # stale: re-touched, evicted, merged away, or no longer a leaf for this worker
            evicted += len(node.edge)
            self._disown(node, worker)
        return EvictStats(evicted, pops)

    def remove_worker(self, worker: str) -> None:
        """Drop all of ``worker``'s ownership at once.  O(its nodes * log)."""
        self.evict(worker, 0)
        for table in (self._sizes, self._node_counts, self._heaps):
            table.pop(worker, None)

    # ---- internals ---------------------------------------------------------------------------------------------

    def _own(self, node: TreeNode, worker: str, now: float) -> None:
        if worker not in node.owners:
            self._sizes[worker] = self._sizes.get(worker, 0) + len(node.edge)
            self._node_counts[worker] = self._node_counts.get(worker, 0) + 1
            parent = node.parent
            assert parent is not None
            parent.child_owners[worker] = parent.child_owners.get(worker, 0) + 1
        node.owners[worker] = now

    def _split(self, node: TreeNode, k: int) -> TreeNode:
        """Cut ``node``'s edge after ``k`` characters; the new upper node is returned.  The lower part keeps the
        node object, so its heap entries stay valid; sizes do not change."""
        parent = node.parent
        assert parent is not None and 0 < k < len(node.edge)
        upper = TreeNode(node.edge[:k], parent)
        upper.owners = dict(node.owners)
        upper.child_owners = dict.fromkeys(node.owners, 1)
        parent.children[upper.edge[0]] = upper
        node.edge = node.edge[k:]
        node.parent = upper
        upper.children[node.edge[0]] = node
        for w in node.owners:
            self._node_counts[w] += 1
        return upper

    def _disown(self, node: TreeNode, worker: str) -> None:
        """Remove ``worker`` from a node where it owns no child, then delete or merge what that leaves."""
        del node.owners[worker]
        self._sizes[worker] -= len(node.edge)
        self._node_counts[worker] -= 1
        parent = node.parent
        assert parent is not None
        left = parent.child_owners[worker] - 1
        if left:
            parent.child_owners[worker] = left
        else:
            del parent.child_owners[worker]
            if parent is not self.root:
                self._push(worker, parent, parent.owners[worker])  # the parent became one of its leaves
        if node.owners:
            self._merge_into_child(node)
        else:  # owned by nobody: no children either (ownership is prefix-closed)
            del parent.children[node.edge[0]]
            node.parent = None
            self._merge_into_child(parent)

    def _merge_into_child(self, node: TreeNode) -> None:
        """Merge a non-root node with one child and identical ownership (times included) into that child."""
        if node is self.root or len(node.children) != 1:
            return
        (child,) = node.children.values()
        if child.owners != node.owners:
            return
        parent = node.parent
        assert parent is not None
        child.edge = node.edge + child.edge
        child.parent = parent
        parent.children[child.edge[0]] = child  # parent.child_owners unchanged: same owners
        for w in node.owners:
            self._node_counts[w] -= 1
        node.owners, node.children, node.parent = {}, {}, None  # dead: its heap entries are stale

    def _push(self, worker: str, node: TreeNode, time: float) -> None:
        heap = self._heaps.setdefault(worker, [])
        heapq.heappush(heap, (time, next(self._seq), node))
        if len(heap) > _HEAP_COMPACT_FACTOR * self._node_counts.get(worker, 0) + _HEAP_COMPACT_SLACK:
            # Amortized O(1) per push: what survives is at most one entry per live leaf of this worker.
            live = {id(n): e for e in heap if (n := e[2]).owners.get(worker) == e[0]
                    and not n.child_owners.get(worker, 0)}
            heap[:] = live.values()
            heapq.heapify(heap)
