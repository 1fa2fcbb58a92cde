"""The static-batch driver returns every KV slot and request row it took, also when a step fails."""

from __future__ import annotations

import pytest

from radixlm.executor.static_batch import OutOfKVMemory, generate_static
from radixlm.sampling import SamplingParams

from conftest import build_tiny_hf_model, make_worker


@pytest.fixture(scope="module")
def tiny_worker(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny"))
    build_tiny_hf_model("llama", path)
    return make_worker(path, max_total_tokens=64)


def test_out_of_kv_memory_frees_nothing_it_did_not_take(tiny_worker):
    allocator, rows = tiny_worker.memory.allocator, tiny_worker.memory.req_to_token_pool
    free_slots, free_rows = allocator.available_size(), rows.available_size()
    with pytest.raises(OutOfKVMemory):
        generate_static(tiny_worker, [[1] * 80])
    assert allocator.available_size() == free_slots == 64
    assert rows.available_size() == free_rows


def test_generation_returns_all_memory(tiny_worker):
    allocator, rows = tiny_worker.memory.allocator, tiny_worker.memory.req_to_token_pool
    out = generate_static(tiny_worker, [[5, 6, 7], [8] * 20],
                          SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True))
    assert [len(o) for o in out] == [10, 10]
    assert allocator.available_size() == 64
    assert rows.available_size() == rows.size
    # every slot handed out again is a real one: the padding page never entered the free list
    assert int(allocator.alloc(64).min()) >= 1
    allocator.clear()
