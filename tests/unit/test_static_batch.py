"""The static-batch driver returns every KV slot and request row it took, also when a step fails."""

from __future__ import annotations

import pytest

from radixlm.executor.batch_builder import OutOfKVMemory
from radixlm.executor.static_batch import generate_static
from radixlm.sampling import SamplingParams

from conftest import build_tiny_hf_model, make_runner


@pytest.fixture(scope="module")
def tiny_runner(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny"))
    build_tiny_hf_model("llama", path)
    return make_runner(path, max_total_tokens=64)


def test_out_of_kv_memory_frees_nothing_it_did_not_take(tiny_runner):
    allocator, rows = tiny_runner.token_to_kv_pool_allocator, tiny_runner.req_to_token_pool
    free_slots, free_rows = allocator.available_size(), rows.available_size()
    with pytest.raises(OutOfKVMemory):
        generate_static(tiny_runner, [[1] * 80])
    assert allocator.available_size() == free_slots == 64
    assert rows.available_size() == free_rows


def test_generation_returns_all_memory(tiny_runner):
    allocator, rows = tiny_runner.token_to_kv_pool_allocator, tiny_runner.req_to_token_pool
    out = generate_static(tiny_runner, [[5, 6, 7], [8] * 20],
                          SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True))
    assert [len(o) for o in out] == [10, 10]
    assert allocator.available_size() == 64
    assert rows.available_size() == rows.size
    # every slot handed out again is a real one: the padding page never entered the free list
    assert int(allocator.alloc(64).min()) >= 1
    allocator.clear()
