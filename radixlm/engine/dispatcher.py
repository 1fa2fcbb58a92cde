"""The front end's choice of DP rank for each request under data-parallel attention (``--load-balance-method``).

Every DP rank has its own scheduler, KV pool and radix cache; the front end tags each ``GenerateRequest`` with the
rank that serves it.  The dispatcher knows only what the front end sent and what came back finished, so its view
of the load is the requests it sent that have not finished:

- ``round_robin``: ranks in turn.
- ``shortest_queue``: fewest unfinished requests, ties by fewest unfinished tokens (prompt + max new tokens), then
  the lowest rank.
- ``prefix``: the rank whose radix cache most likely holds the longest prefix of the prompt.  Each rank keeps an
  approximate index of the prompts it was sent: chained hashes of their leading ``BLOCK_TOKENS``-token blocks
  (block k's hash covers blocks 0..k), bounded by LRU.  A rank whose queue is longer than the shortest by more than
  ``prefix_slack`` requests is passed over (a hot prefix must not pile every request onto one rank); without a
  match of at least one block among the others, ``shortest_queue`` decides.  The index forgets nothing the radix
  cache evicts, so it is a guess, never a promise.

A prompt with n > 1 copies is dispatched once: the copies go to one rank, where they share its prefill.
Not thread-safe: the engine calls it under its lock.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

from radixlm.config.server_args import LOAD_BALANCE_METHODS

BLOCK_TOKENS = 64
DEFAULT_BLOCKS_PER_RANK = 1 << 16  # LRU bound of each rank's prefix index (hashes, ~100 bytes each)
DEFAULT_PREFIX_SLACK = 8  # requests a prefix match may put on a rank beyond the shortest queue


def block_hashes(prompt: list[int], block: int = BLOCK_TOKENS) -> list[int]:
    """Chained hashes of the prompt's whole ``block``-token blocks: entry k identifies blocks 0..k together."""
    hashes, h = [], 0
    for start in range(0, len(prompt) - block + 1, block):
        h = hash((h, tuple(prompt[start : start + block])))
        hashes.append(h)
    return hashes


class PrefixIndex:
    """One DP rank's approximate set of cached prompt prefixes, as chained block hashes, at most ``capacity``.

    ``insert`` touches a prompt's blocks from the last to the first, so a prefix block is always more recent than
    the blocks after it: eviction drops deeper blocks first and the index stays closed under prefixes, which makes
    the first missing block the end of the longest match."""

    def __init__(self, capacity: int = DEFAULT_BLOCKS_PER_RANK) -> None:
        self.capacity = capacity
        self._lru: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._lru)

    def insert(self, hashes: list[int]) -> None:
        for h in reversed(hashes):
            self._lru[h] = None
            self._lru.move_to_end(h)
        while len(self._lru) > self.capacity:
            self._lru.popitem(last=False)

    def match(self, hashes: list[int]) -> int:
        """How many leading blocks of the prompt (given by its ``block_hashes``) the index holds."""
        for k, h in enumerate(hashes):
            if h not in self._lru:
                return k
        return len(hashes)


class Dispatcher:
    """Picks the DP rank of each request and tracks the unfinished requests sent to every rank."""

    def __init__(self, dp_size: int, method: str = "shortest_queue", blocks_per_rank: int = DEFAULT_BLOCKS_PER_RANK,
                 prefix_slack: int = DEFAULT_PREFIX_SLACK) -> None:
        if method not in LOAD_BALANCE_METHODS:
            raise ValueError(f"unknown load balance method {method!r}; one of {', '.join(LOAD_BALANCE_METHODS)}")
        self.dp_size = dp_size
        self.method = method
        self.prefix_slack = prefix_slack
        self.num_reqs = [0] * dp_size  # unfinished requests sent to each rank
        self.num_tokens = [0] * dp_size  # their prompt + max new tokens
        self._sent: dict[str, tuple[int, int]] = {}  # rid -> (rank, tokens)
        self._turn = itertools.cycle(range(dp_size))
        self.indexes = [PrefixIndex(blocks_per_rank) for _ in range(dp_size)] if method == "prefix" else []

    def dispatch(self, prompt: list[int], requests: list[tuple[str, int]]) -> int:
        """The rank for ``requests`` ((rid, prompt + max new tokens) each: the copies of one prompt, sent there
        now or later); records them as unfinished there."""
        if self.method == "round_robin":
            rank = next(self._turn)
        elif self.method == "prefix":
            rank = self._by_prefix(prompt)
        else:
            rank = self._shortest()
        for rid, tokens in requests:
            self._sent[rid] = (rank, tokens)
            self.num_reqs[rank] += 1
            self.num_tokens[rank] += tokens
        return rank

    def finish(self, rid: str) -> None:
        """Request ``rid`` finished (or failed); unknown rids are ignored."""
        sent = self._sent.pop(rid, None)
        if sent is not None:
            rank, tokens = sent
            self.num_reqs[rank] -= 1
            self.num_tokens[rank] -= tokens

    def clear(self) -> None:
        """Every request is gone (the engine failed or shut down)."""
        for rid in list(self._sent):
            self.finish(rid)

    def _shortest(self, ranks: range | list[int] | None = None) -> int:
        return min(ranks if ranks is not None else range(self.dp_size),
                   key=lambda r: (self.num_reqs[r], self.num_tokens[r], r))

    def _by_prefix(self, prompt: list[int]) -> int:
        hashes = block_hashes(prompt)
        shortest = min(self.num_reqs)
        eligible = [r for r in range(self.dp_size) if self.num_reqs[r] - shortest <= self.prefix_slack]
        matches = {r: self.indexes[r].match(hashes) for r in eligible}
        best = max(matches.values())
        rank = self._shortest([r for r in eligible if matches[r] == best]) if best > 0 else self._shortest()
        self.indexes[rank].insert(hashes)
        return rank


__all__ = ["BLOCK_TOKENS", "Dispatcher", "LOAD_BALANCE_METHODS", "PrefixIndex", "block_hashes"]
