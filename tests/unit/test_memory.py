"""Unit tests for radixlm.mem: the request table, the paged KV-slot allocator and the KV buffers."""

from __future__ import annotations

import random

import pytest
import torch

from radixlm.mem import KVCacheSpec, MHAKVPool, MLAKVPool, ReqToTokenPool, TokenToKVPoolAllocator, create_kv_pool
from radixlm.mem import assign_kv_slots, release_kv_tail


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def slot_list(t: torch.Tensor | None) -> list[int]:
    assert t is not None
    assert t.dtype == torch.int64
    return [int(x) for x in t.tolist()]


# ----------------------------------------------------------------------------------------------- ReqToTokenPool


def test_req_pool_alloc_free_counts() -> None:
    """alloc takes exactly n rows, free gives them back, and available_size tracks both."""
    pool = ReqToTokenPool(size=5, max_context_len=8, device="cpu")
    assert pool.available_size() == 5
    rows = pool.alloc(3)
    assert rows is not None and len(rows) == 3 and len(set(rows)) == 3
    assert all(0 <= r < 5 for r in rows)
    assert pool.available_size() == 2
    pool.free(rows[0])  # a single int is accepted
    assert pool.available_size() == 3
    pool.free(rows[1:])
    assert pool.available_size() == 5
    assert pool.req_to_token.shape == (5, 8) and pool.req_to_token.dtype == torch.int32


def test_req_pool_alloc_beyond_capacity_takes_nothing() -> None:
    """Asking for more rows than are free returns None and leaves the free count untouched."""
    pool = ReqToTokenPool(size=4, max_context_len=2, device="cpu")
    held = pool.alloc(3)
    assert held is not None
    assert pool.alloc(2) is None
    assert pool.available_size() == 1
    last = pool.alloc(1)
    assert last is not None and last[0] not in held
    assert pool.alloc(1) is None
    assert pool.alloc(0) == []


def test_req_pool_rows_never_handed_out_twice() -> None:
    """Over a seeded random sequence of allocs and frees, a held row is never handed out again."""
    rng = random.Random(1234)
    pool = ReqToTokenPool(size=16, max_context_len=4, device="cpu")
    held: set[int] = set()
    for _ in range(1000):
        if held and rng.random() < 0.45:
            victims = rng.sample(sorted(held), rng.randint(1, len(held)))
            pool.free(victims)
            held.difference_update(victims)
        else:
            n = rng.randint(1, 6)
            rows = pool.alloc(n)
            if n > 16 - len(held):
                assert rows is None
            else:
                assert rows is not None and len(rows) == n
                assert not set(rows) & held and len(set(rows)) == n
                assert all(0 <= r < 16 for r in rows)
                held.update(rows)
        assert pool.available_size() == 16 - len(held)


def test_req_pool_write_maps_positions() -> None:
    """write(row, start, slots) sets exactly columns start..start+len-1 of that row (as int32)."""
    pool = ReqToTokenPool(size=3, max_context_len=10, device="cpu")
    pool.write(1, 0, torch.tensor([7, 8, 9], dtype=torch.int64))
    pool.write(1, 3, torch.tensor([40, 41]))
    pool.write(2, 8, torch.tensor([5, 6]))
    expected = torch.zeros(3, 10, dtype=torch.int32)
    expected[1, :5] = torch.tensor([7, 8, 9, 40, 41], dtype=torch.int32)
    expected[2, 8:] = torch.tensor([5, 6], dtype=torch.int32)
    assert pool.req_to_token.dtype == torch.int32
    assert torch.equal(pool.req_to_token, expected)


# ------------------------------------------------------------------------------------ allocator, page_size == 1


def test_allocator_page1_slot0_never_and_full_capacity() -> None:
    """With page_size 1 the whole pool is slots 1..size: slot 0 is never returned, every other slot is."""
    alloc = TokenToKVPoolAllocator(size=10, page_size=1)
    assert alloc.available_size() == 10
    slots = slot_list(alloc.alloc(10))
    assert sorted(slots) == list(range(1, 11))
    assert alloc.available_size() == 0
    assert alloc.alloc(1) is None


def test_allocator_page1_random_no_double_handout() -> None:
    """~2000 seeded random allocs/frees against a set model: no slot is handed out twice while held,
    slot 0 never, frees return capacity exactly, and short allocations return None and change nothing."""
    rng = random.Random(2024)
    size = 64
    alloc = TokenToKVPoolAllocator(size=size, page_size=1)
    held: set[int] = set()
    owners: list[list[int]] = []
    for step in range(2000):
        op = rng.random()
        if owners and op < 0.4:
            victim = owners.pop(rng.randrange(len(owners)))
            alloc.free(torch.tensor(victim, dtype=rng.choice([torch.int64, torch.int32])))
            held.difference_update(victim)
        elif owners and op < 0.5:
            # a batched free of several requests
            alloc.free_group_begin()
            for _ in range(rng.randint(1, len(owners))):
                victim = owners.pop(rng.randrange(len(owners)))
                alloc.free(torch.tensor(victim))
                held.difference_update(victim)
            alloc.free_group_end()
        else:
            n = rng.randint(0, 12)
            before = alloc.available_size()
            got = alloc.alloc(n)
            if n > size - len(held):
                assert got is None
                assert alloc.available_size() == before
                continue
            slots = slot_list(got)
            assert len(slots) == n and len(set(slots)) == n
            assert 0 not in slots
            assert all(1 <= s <= size for s in slots)
            assert not set(slots) & held, f"step {step}: slot handed out twice"
            held.update(slots)
            owners.append(slots)
        assert alloc.available_size() == size - len(held)


def test_allocator_page1_short_alloc_changes_nothing() -> None:
    """alloc(n) with n > available returns None; the free slots are still exactly the same afterwards."""
    alloc = TokenToKVPoolAllocator(size=8, page_size=1)
    first = slot_list(alloc.alloc(5))
    assert alloc.alloc(4) is None
    assert alloc.available_size() == 3
    rest = slot_list(alloc.alloc(3))
    assert sorted(first + rest) == list(range(1, 9))


def test_allocator_page1_alloc_extend_is_plain_alloc() -> None:
    """With page_size 1, alloc_extend ignores last_locs and hands out sum(seq - prefix) fresh slots."""
    alloc = TokenToKVPoolAllocator(size=16, page_size=1)
    slots = slot_list(alloc.alloc_extend([0, 3, 5], [2, 7, 5], [0, 99, 99]))
    assert len(slots) == 6 and len(set(slots)) == 6 and 0 not in slots and 99 not in slots
    assert alloc.available_size() == 10
    assert alloc.alloc_extend([0], [11], [0]) is None
    assert alloc.available_size() == 10


def test_allocator_free_group_batches_and_counts_pending() -> None:
    """Frees inside free_group_begin/end count as available at once and can be re-allocated, even before
    free_group_end; after the group every slot is allocatable again exactly once."""
    alloc = TokenToKVPoolAllocator(size=12, page_size=1)
    a = alloc.alloc(4)
    b = alloc.alloc(4)
    c = alloc.alloc(4)
    assert a is not None and b is not None and c is not None
    assert alloc.available_size() == 0
    alloc.free_group_begin()
    alloc.free(a)
    alloc.free(torch.empty(0, dtype=torch.int64))  # empty free is a no-op
    alloc.free(b)
    assert alloc.available_size() == 8
    again = slot_list(alloc.alloc(8))  # needs the pending frees
    assert sorted(again) == sorted(slot_list(a) + slot_list(b))
    alloc.free(torch.tensor(again))
    alloc.free(c)
    alloc.free_group_end()
    assert alloc.available_size() == 12
    assert sorted(slot_list(alloc.alloc(12))) == list(range(1, 13))


def test_allocator_clear_restores_everything() -> None:
    """clear() forgets every allocation and pending free."""
    alloc = TokenToKVPoolAllocator(size=8, page_size=2)
    alloc.alloc(5)
    alloc.free_group_begin()
    alloc.free(torch.tensor([2, 3]))
    alloc.clear()
    alloc.free_group_end()
    assert alloc.available_size() == 8
    assert sorted(slot_list(alloc.alloc(8))) == list(range(2, 10))


def test_allocator_size_must_be_page_multiple() -> None:
    """A pool size that is not a whole number of pages is rejected."""
    with pytest.raises(ValueError, match="multiple of the page size"):
        TokenToKVPoolAllocator(size=10, page_size=4)


# ------------------------------------------------------------------------------------ allocator, page_size > 1


@pytest.mark.parametrize("page_size", [4, 16])
def test_paged_alloc_returns_aligned_fresh_pages(page_size: int) -> None:
    """alloc(n) returns the first n slots of ceil(n/p) whole fresh pages: slot i sits at offset i % p of
    its page, pages are distinct, the first page is never used, and the whole last page is taken."""
    p = page_size
    alloc = TokenToKVPoolAllocator(size=8 * p, page_size=p)
    held_pages: set[int] = set()
    for n in (1, p, p + 1, 3 * p - 1):
        before = alloc.available_size()
        slots = slot_list(alloc.alloc(n))
        assert len(slots) == n
        pages = [s // p for s in slots]
        assert all(s % p == i % p for i, s in enumerate(slots))
        assert all(pages[i] == pages[i - i % p] for i in range(n))  # one page per p consecutive slots
        new_pages = set(pages)
        assert len(new_pages) == ceil_div(n, p)
        assert 0 not in new_pages and all(1 <= pg <= 8 for pg in new_pages)
        assert not new_pages & held_pages
        held_pages |= new_pages
        assert alloc.available_size() == before - ceil_div(n, p) * p
    # 1 + 1 + 2 + 3 = 7 pages held, 1 left
    assert alloc.available_size() == p
    assert alloc.alloc(p + 1) is None
    assert alloc.available_size() == p


def check_request_slots(slots: list[int], page_size: int) -> None:
    """Slots of positions 0..len-1 of one request: position q sits at offset q % p, and positions in the same
    page-of-positions share one KV page."""
    p = page_size
    for q, s in enumerate(slots):
        assert s % p == q % p, f"position {q} at slot {s}"
        assert s // p == slots[q - q % p] // p, f"position {q} left its page"
        assert s >= p, "the first page is the padding page"


def test_alloc_extend_mixed_requests_exact() -> None:
    """One alloc_extend call over four requests (prefix on a page boundary, mid-page, zero prefix, an extension
    that stays inside the last page): partial last pages are filled in place with last_loc+1.., then fresh
    pages in request order; exactly the new pages are consumed."""
    p = 4
    alloc = TokenToKVPoolAllocator(size=64, page_size=p)
    a = slot_list(alloc.alloc_extend([0], [8], [0]))  # A: 8 tokens, boundary
    b = slot_list(alloc.alloc_extend([0], [6], [0]))  # B: 6 tokens, mid-page
    d = slot_list(alloc.alloc_extend([0], [5], [0]))  # D: 5 tokens
    for r in (a, b, d):
        check_request_slots(r, p)
    assert alloc.available_size() == 64 - 6 * p
    # A 8->11, B 6->13, C 0->3, D 5->7
    out = slot_list(alloc.alloc_extend([8, 6, 0, 5], [11, 13, 3, 7], [a[-1], b[-1], 0, d[-1]]))
    assert len(out) == 3 + 7 + 3 + 2
    new_a, new_b, new_c, new_d = out[:3], out[3:10], out[10:13], out[13:]
    assert new_b[:2] == [b[-1] + 1, b[-1] + 2]  # rest of B's page 1
    assert new_d == [d[-1] + 1, d[-1] + 2]  # D stays inside its last page
    full_a, full_b, full_d = a + new_a, b + new_b, d + new_d
    for r in (full_a, full_b, new_c, full_d):
        check_request_slots(r, p)
    fresh = {s // p for s in new_a + new_b[2:] + new_c}
    assert len(fresh) == 1 + 2 + 1  # A: 1 page, B: 2 pages, C: 1 page, D: none
    old = {s // p for s in a + b + d}
    assert not fresh & old and 0 not in fresh
    assert alloc.available_size() == 64 - 10 * p


@pytest.mark.parametrize("page_size", [4, 16])
def test_alloc_extend_short_returns_none_and_changes_nothing(page_size: int) -> None:
    """When the new pages do not fit, alloc_extend returns None and allocates nothing, even if some of the
    tokens would fit the requests' partial last pages."""
    p = page_size
    alloc = TokenToKVPoolAllocator(size=3 * p, page_size=p)
    r = slot_list(alloc.alloc_extend([0], [p + 1], [0]))  # 2 pages, 1 left
    assert alloc.alloc_extend([p + 1, 0], [2 * p, 2 * p], [r[-1], 0]) is None  # needs 2 fresh pages
    assert alloc.available_size() == p
    # An extension inside the last page needs no fresh page, so it fits even with nothing free.
    last = slot_list(alloc.alloc(p))
    assert alloc.available_size() == 0
    inside = slot_list(alloc.alloc_extend([p + 1], [2 * p], [r[-1]]))
    assert inside == list(range(r[-1] + 1, r[-1] + p))
    assert alloc.alloc_extend([2 * p], [2 * p + 1], [inside[-1]]) is None
    assert alloc.alloc_extend([3], [3], [0]) is not None  # nothing new: always fits
    alloc.free(torch.tensor(last))
    assert alloc.available_size() == p


@pytest.mark.parametrize("page_size", [4, 16])
def test_alloc_extend_random_against_page_model(page_size: int) -> None:
    """Seeded random batches of extends and frees against a model of held pages: every position's slot is
    in its request's page for that page-of-positions at the right offset, fresh pages are never held by
    anyone else or page 0, a short batch returns None and changes nothing, and frees return whole pages."""
    p = page_size
    num_pages = 24
    rng = random.Random(7 + p)
    alloc = TokenToKVPoolAllocator(size=num_pages * p, page_size=p)
    held: set[int] = set()  # pages held by some request
    reqs: dict[int, list[int]] = {}  # request id -> slot of each position
    next_id = 0
    for _ in range(600):
        if reqs and rng.random() < 0.25:
            rid = rng.choice(sorted(reqs))
            slots = reqs.pop(rid)
            if slots:
                alloc.free(torch.tensor(slots))
            held.difference_update(s // p for s in slots)
        else:
            batch = rng.sample(sorted(reqs), min(len(reqs), rng.randint(0, 3)))
            if rng.random() < 0.5 or not batch:
                batch.append(next_id)
                reqs[next_id] = []
                next_id += 1
            prefix = [len(reqs[r]) for r in batch]
            seq = [q + rng.choice([0, 1, 1, 2, p - 1, p, p + 1, 2 * p + 3]) for q in prefix]
            last = [reqs[r][-1] if reqs[r] else 0 for r in batch]
            need = sum(ceil_div(s, p) - ceil_div(q, p) for q, s in zip(prefix, seq))
            before = alloc.available_size()
            out = alloc.alloc_extend(prefix, seq, last)
            if need > num_pages - len(held):
                assert out is None
                assert alloc.available_size() == before
                for r in batch:  # requests created for this batch hold nothing
                    if not reqs[r]:
                        del reqs[r]
                continue
            got = slot_list(out)
            assert len(got) == sum(seq) - sum(prefix)
            offset, fresh = 0, set()
            for r, q, s in zip(batch, prefix, seq):
                new = got[offset : offset + s - q]
                offset += s - q
                old_pages = {x // p for x in reqs[r]}
                fresh |= {x // p for x in new} - old_pages
                reqs[r] = reqs[r] + new
                check_request_slots(reqs[r], p)
            assert len(fresh) == need
            assert 0 not in fresh and not fresh & held
            held |= fresh
        assert alloc.available_size() == (num_pages - len(held)) * p
        all_slots = [x for slots in reqs.values() for x in slots]
        assert len(all_slots) == len(set(all_slots))
        assert held == {x // p for x in all_slots}


# ----------------------------------------------------------------------------------------------- KV pools


def test_kv_pool_shapes_and_zero_init() -> None:
    """Each layer has K and V buffers of [size + page_size, kv_heads, head_dim], all zeros, in the pool dtype."""
    pool = create_kv_pool(KVCacheSpec.mha(3, 2, 8, torch.bfloat16), size=32, page_size=4, device="cpu")
    assert isinstance(pool, MHAKVPool)
    assert len(pool.k_buffers) == len(pool.v_buffers) == 3
    for layer in range(3):
        k, v = pool.get_kv_buffer(layer)
        for buf in (k, v):
            assert buf.shape == (36, 2, 8) and buf.dtype == torch.bfloat16
            assert torch.count_nonzero(buf) == 0
    assert k.data_ptr() != v.data_ptr()
    assert pool.k_buffers[0].data_ptr() != pool.k_buffers[1].data_ptr()
    assert pool.bytes() == 2 * 3 * 36 * 2 * 8 * 2


def test_kv_pool_set_get_round_trip() -> None:
    """set_kv writes K and V at exactly the given slots of that layer; everything else stays zero."""
    torch.manual_seed(0)
    pool = MHAKVPool(KVCacheSpec.mha(2, 2, 4, torch.float32), size=16, page_size=1, device="cpu")
    loc = torch.tensor([3, 1, 9])
    k, v = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    pool.set_kv(1, loc, k, v)
    kb, vb = pool.get_kv_buffer(1)
    assert torch.equal(kb[loc], k) and torch.equal(vb[loc], v)
    others = torch.ones(17, dtype=torch.bool)
    others[loc] = False
    assert torch.count_nonzero(kb[others]) == 0 and torch.count_nonzero(vb[others]) == 0
    k0, v0 = pool.get_kv_buffer(0)
    assert torch.count_nonzero(k0) == 0 and torch.count_nonzero(v0) == 0


def test_kv_pool_set_casts_to_pool_dtype() -> None:
    """Float32 K/V written to a float16 pool are stored rounded to float16."""
    pool = MHAKVPool(KVCacheSpec.mha(1, 1, 2, torch.float16), size=4, page_size=1, device="cpu")
    k = torch.tensor([[[1.0001, -2.5]]])
    v = torch.tensor([[[3.14159, 65504.0]]])
    pool.set_kv(0, torch.tensor([2]), k, v)
    kb, vb = pool.get_kv_buffer(0)
    assert kb.dtype == torch.float16
    assert torch.equal(kb[2], k[0].to(torch.float16))
    assert torch.equal(vb[2], v[0].to(torch.float16))
    assert kb[2, 0, 0].item() == 1.0  # 1.0001 is not representable in float16


def test_kv_spec_bytes_per_token() -> None:
    """The memory sizing's unit: K and V per KV head per layer (MHA), one latent vector per layer (MLA)."""
    assert KVCacheSpec.mha(2, 2, 16, torch.float32).bytes_per_token() == 2 * 2 * (16 + 16) * 4
    assert KVCacheSpec.mha(2, 1, 16, torch.bfloat16, v_head_dim=8).bytes_per_token() == 2 * 1 * (16 + 8) * 2
    mla = KVCacheSpec.mla(num_layers=27, kv_lora_rank=512, qk_rope_head_dim=64, dtype=torch.bfloat16)
    assert (mla.num_kv_heads, mla.head_dim, mla.v_head_dim) == (1, 576, 512)
    assert mla.bytes_per_token() == 27 * 576 * 2  # DeepSeek-V2-Lite: 31 KB per token, no heads
    with pytest.raises(ValueError, match="MLA"):
        KVCacheSpec("mla", 2, 2, 576, 512, torch.bfloat16)
    pool = create_kv_pool(mla, size=8, page_size=4, device="cpu")
    assert isinstance(pool, MLAKVPool) and pool.bytes() == 27 * 12 * 576 * 2


def test_mla_pool_stores_one_vector_and_reads_v_in_place() -> None:
    """The MLA pool keeps the latent + rope vector once; V is a view of its latent part (no copy)."""
    spec = KVCacheSpec.mla(num_layers=2, kv_lora_rank=6, qk_rope_head_dim=2, dtype=torch.float32)
    pool = create_kv_pool(spec, size=8, page_size=1, device="cpu")
    loc = torch.tensor([5, 2])
    latent = torch.randn(2, 1, 8)
    pool.set_kv(1, loc, latent, None)
    k, v = pool.get_kv_buffer(1)
    assert k.shape == (9, 1, 8) and v.shape == (9, 1, 6)
    assert torch.equal(k[loc], latent) and torch.equal(v[loc], latent[..., :6])
    assert v.data_ptr() == k.data_ptr() and not v.is_contiguous()
    assert torch.count_nonzero(pool.get_kv_buffer(0)[0]) == 0


@pytest.mark.parametrize("page_size", [1, 4])
def test_assign_and_roll_back_kv_slots(page_size: int) -> None:
    """``assign_kv_slots`` maps new positions in req_to_token (continuing a partly filled page); rolling back
    rejected tokens frees exactly the pages that hold only rolled-back positions, and the next tokens continue
    the kept partial page."""
    p = page_size
    pool, alloc = ReqToTokenPool(2, 64, "cpu"), TokenToKVPoolAllocator(32, p, "cpu")
    row = pool.alloc(1)[0]
    first = assign_kv_slots(pool, alloc, [row], [0], [3])
    assert pool.req_to_token[row, :3].tolist() == first.tolist()
    spec = assign_kv_slots(pool, alloc, [row], [3], [3 + 2 * p + 1])  # k speculative tokens
    held = alloc.available_size()
    release_kv_tail(pool, alloc, row, keep_len=4, kv_len=3 + 2 * p + 1)  # accept one draft token
    freed = alloc.available_size() - held
    assert freed == (-(-(3 + 2 * p + 1) // p) - -(-4 // p)) * p
    nxt = assign_kv_slots(pool, alloc, [row], [4], [5])
    slots = pool.req_to_token[row, :5].tolist()
    assert slots[:4] == first.tolist() + spec.tolist()[:1] and slots[4] == int(nxt[0])
    assert all(s % p == i % p for i, s in enumerate(slots)), "position i lives at slot offset i % page_size"
    with pytest.raises(ValueError):
        release_kv_tail(pool, alloc, row, keep_len=6, kv_len=5)
