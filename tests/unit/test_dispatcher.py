"""The front end's DP-rank dispatcher (``radixlm.engine.dispatcher``), model-free: exact choices per method, load
bookkeeping through finishes, and the prefix index's longest match against a brute-force search."""

from __future__ import annotations

import random

import pytest

from radixlm.config import ServerArgs
from radixlm.engine.dispatcher import BLOCK_TOKENS, Dispatcher, PrefixIndex, block_hashes

B = BLOCK_TOKENS


def prompt(*blocks: int, tail: int = 0) -> list[int]:
    """Whole blocks of constant tokens (block id b: ``B`` copies of b), then ``tail`` more tokens (id 999)."""
    return [t for b in blocks for t in [b] * B] + [999] * tail


def test_round_robin_cycles_and_copies_share_a_rank():
    d = Dispatcher(3, "round_robin")
    assert [d.dispatch([1], [(f"r{i}", 10)]) for i in range(4)] == [0, 1, 2, 0]
    assert d.dispatch([1], [("a-0", 5), ("a-1", 5), ("a-2", 5)]) == 1  # n copies: one turn, one rank
    assert d.num_reqs == [2, 4, 1] and d.num_tokens == [20, 25, 10]


def test_shortest_queue_by_requests_then_tokens_then_rank():
    d = Dispatcher(3, "shortest_queue")
    assert d.dispatch([1], [("a", 100)]) == 0
    assert d.dispatch([1], [("b", 10)]) == 1
    assert d.dispatch([1], [("c", 50)]) == 2
    # one request each: the fewest tokens wins (rank 1), then rank 2, then rank 0
    assert d.dispatch([1], [("d", 1)]) == 1
    assert d.dispatch([1], [("e", 1)]) == 2
    assert d.dispatch([1], [("f", 1)]) == 0
    assert d.num_reqs == [2, 2, 2]
    d.finish("b")
    d.finish("d")
    d.finish("unknown")  # ignored
    assert d.num_reqs == [2, 0, 2] and d.num_tokens == [101, 0, 51]
    assert d.dispatch([1], [("g", 7), ("h", 7)]) == 1  # two copies count two requests there
    assert d.num_reqs == [2, 2, 2]
    assert d.dispatch([1], [("i", 1)]) == 1  # ties on requests: rank 1's 14 tokens are the fewest
    d.clear()
    assert d.num_reqs == [0, 0, 0] and d.num_tokens == [0, 0, 0]


def test_prefix_goes_where_the_prefix_went():
    d = Dispatcher(2, "prefix")
    assert d.dispatch(prompt(1, 2, tail=5), [("a", 1)]) == 0  # nothing cached anywhere: shortest queue
    assert d.dispatch(prompt(7, 8), [("b", 1)]) == 1  # no match: shortest queue (rank 1 is empty)
    assert d.dispatch(prompt(1, 2, 3), [("c", 1)]) == 0  # two blocks match on rank 0
    assert d.dispatch(prompt(7, 9), [("d", 1)]) == 1  # one block matches on rank 1
    assert d.dispatch(prompt(1, tail=B - 1), [("e", 1)]) == 0  # one whole block matches
    assert d.dispatch(prompt(tail=B - 1), [("f", 1)]) == 1  # less than a block: shortest queue (2 < 3)
    # Rank 0 caches block 2 after block 1 only; as a first block it is another chain: no match, a tie, rank 0.
    assert d.dispatch(prompt(2, 3), [("g", 1)]) == 0
    assert d.num_reqs == [4, 3]


def test_prefix_gives_way_to_a_much_shorter_queue():
    d = Dispatcher(2, "prefix", prefix_slack=2)
    hot = prompt(5, 6)
    ranks = [d.dispatch(hot, [(f"r{i}", 1)]) for i in range(6)]
    # rank 0 takes the prefix and keeps it while its queue is at most 2 longer; then rank 1 is the only eligible
    # rank (no match: shortest queue), and once rank 1 has seen the prompt both match and the shorter queue wins
    assert ranks == [0, 0, 0, 1, 1, 1]
    assert d.num_reqs == [3, 3]
    for rid in ("r0", "r1", "r2", "r5"):
        d.finish(rid)
    assert d.dispatch(hot, [("x", 1)]) == 0  # both match two blocks: the shorter queue (0 < 2)


def test_prefix_index_longest_match_equals_brute_force():
    """Random prompts over a tiny alphabet of blocks (so prefixes collide often), inserted into one index without
    eviction: the match of every probe equals the longest common whole-block prefix with any inserted prompt."""
    rng = random.Random(0)
    index = PrefixIndex(capacity=1 << 20)
    inserted: list[list[int]] = []
    for _ in range(300):
        p = prompt(*[rng.randrange(3) for _ in range(rng.randrange(0, 6))], tail=rng.randrange(0, B))
        probe = p if rng.random() < 0.5 else prompt(*[rng.randrange(3) for _ in range(rng.randrange(0, 6))])
        want = max((common_blocks(probe, q) for q in inserted), default=0)
        assert index.match(block_hashes(probe)) == want
        index.insert(block_hashes(p))
        inserted.append(p)


def common_blocks(a: list[int], b: list[int]) -> int:
    n = 0
    while (n + 1) * B <= min(len(a), len(b)) and a[n * B : (n + 1) * B] == b[n * B : (n + 1) * B]:
        n += 1
    return n


def test_prefix_index_evicts_deep_blocks_first():
    """At capacity the least recent blocks go, deepest first, so what remains is still a set of whole prefixes."""
    index = PrefixIndex(capacity=4)
    first = block_hashes(prompt(1, 2, 3))
    index.insert(first)
    index.insert(block_hashes(prompt(4, 5)))  # 5 blocks > 4: the deepest block of the first prompt goes
    assert len(index) == 4
    assert index.match(first) == 2
    assert index.match(block_hashes(prompt(4, 5, 6))) == 2


def test_block_hashes_cover_whole_blocks_only():
    assert block_hashes(prompt(tail=B - 1)) == []
    assert len(block_hashes(prompt(1, 2, tail=3))) == 2
    assert block_hashes(prompt(1, 2))[0] == block_hashes(prompt(1, 3))[0]
    assert block_hashes(prompt(1, 2))[1] != block_hashes(prompt(3, 2))[1]  # chained: block 1 depends on block 0


def test_load_balance_method_flag():
    assert ServerArgs().load_balance_method == "shortest_queue"
    assert ServerArgs(load_balance_method="prefix").load_balance_method == "prefix"
    with pytest.raises(ValueError, match="--load-balance-method must be one of round_robin, shortest_queue, prefix"):
        ServerArgs(load_balance_method="random")
    with pytest.raises(ValueError, match="unknown load balance method"):
        Dispatcher(2, "random")
