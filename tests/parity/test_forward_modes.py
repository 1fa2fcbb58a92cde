"""The forward modes beyond EXTEND/DECODE and the model inputs/outputs beyond token ids, on every attention
backend, against HF transformers on the same weights (float32):

- MIXED: prefill chunks and one-token decode rows in one forward give each row the logits of its whole sequence;
- TARGET_VERIFY: k draft tokens under a tree (or chain) mask give each draft token the logits of its
  root-to-token path; rejected draft tokens' KV is rolled back and decoding continues correctly;
- IDLE: a step without tokens runs (every layer, its collectives) and returns nothing;
- hidden states on request, and prompt positions given as embeddings (``inputs_embeds``).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from radixlm.attention import UnsupportedForwardMode
from radixlm.core import Batch, ForwardMode, VerifyInput
from radixlm.executor.static_batch import decode_batch, extend_batch, release
from radixlm.kernels import cpu as cpu_kernels
from radixlm.mem import assign_kv_slots, release_kv_tail

from conftest import build_tiny_hf_model, make_worker

TOL = 1e-4
BACKENDS = ["torch_native", "cpu", "triton"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_llama"))
    return path, build_tiny_hf_model("llama", path)


def worker_for(path: str, backend: str):
    """The Triton kernels run on the GPU where there is one (else under the interpreter), the others on CPU."""
    if backend == "cpu" and not cpu_kernels.available():
        pytest.skip("no C compiler: the CPU kernels are not built")
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    return make_worker(path, attention_backend=backend, dtype="float32", device=device)


def hf_last(hf, ids: list[int], embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's logits and final hidden state at the last position of ``ids`` (``embeds``: inputs_embeds)."""
    with torch.no_grad():
        if embeds is None:
            out = hf(torch.tensor([ids]), output_hidden_states=True)
        else:
            out = hf(inputs_embeds=embeds[None], output_hidden_states=True)
    return out.logits[0, -1].float(), out.hidden_states[-1][0, -1].float()


def prefill(worker, prompts: list[list[int]]) -> list[int]:
    rows = worker.memory.req_to_token_pool.alloc(len(prompts))
    worker.run(extend_batch(worker.memory, rows, [0] * len(prompts), prompts))
    return rows


def planned(worker, mode: ForwardMode, rows: list[int], prefix_lens: list[int], new: list[list[int]]) -> Batch:
    seq = [p + len(n) for p, n in zip(prefix_lens, new)]
    slots = assign_kv_slots(worker.memory.req_to_token_pool, worker.memory.allocator, rows, prefix_lens, seq)
    return Batch(mode, rows, prefix_lens, [len(n) for n in new], [t for n in new for t in n], slots)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_step_equals_each_row_alone(tiny, backend):
    path, hf = tiny
    worker = worker_for(path, backend)
    a, b = list(range(3, 15)), [7, 9, 11, 2, 40, 41, 42]
    rows = prefill(worker, [a, b])
    new_prompt = list(range(100, 109))
    rows.append(worker.memory.req_to_token_pool.alloc(1)[0])
    batch = planned(worker, ForwardMode.MIXED, [rows[2], rows[0], rows[1]], [0, len(a), len(b)],
                    [new_prompt, [500], [501]])
    logits = worker.launch(batch).logits.next_token_logits
    for i, seq in enumerate([new_prompt, a + [500], b + [501]]):
        assert (logits[i].cpu() - hf_last(hf, seq)[0]).abs().max() < TOL, f"row {i}"
    release(worker, rows, [len(a) + 1, len(b) + 1, len(new_prompt)])


def tree_masks(parents: list[int]) -> torch.Tensor:
    """[k, k] bool: draft token j sees itself and its ancestors (``parents[j] < j``, -1: hangs off the prefix)."""
    k = len(parents)
    mask = torch.zeros(k, k, dtype=torch.bool)
    for j in range(k):
        a = j
        while a >= 0:
            mask[j, a] = True
            a = parents[a]
    return mask


@pytest.mark.parametrize("backend", BACKENDS)
def test_target_verify_scores_every_draft_path(tiny, backend):
    path, hf = tiny
    worker = worker_for(path, backend)
    p, q = list(range(20, 30)), [5, 6, 7, 8, 9, 10, 11]
    rows = prefill(worker, [p, q])
    tree_parents, tree = [-1, 0, 0, 1, 2], [300, 301, 302, 303, 304]
    chain = [400, 401, 402]
    batch = planned(worker, ForwardMode.TARGET_VERIFY, rows, [len(p), len(q)], [tree, chain])
    batch.verify = VerifyInput([tree_masks(tree_parents), tree_masks([-1, 0, 1])])
    launched = worker.launch(batch)
    logits = launched.logits.next_token_logits.cpu()  # [8, vocab]: one row per draft token
    result = worker.sample(launched).result()
    expected = []
    for j in range(len(tree)):
        path_ids, a = [], j
        while a >= 0:
            path_ids.insert(0, tree[a])
            a = tree_parents[a]
        expected.append(hf_last(hf, p + path_ids)[0])
    expected += [hf_last(hf, q + chain[: j + 1])[0] for j in range(len(chain))]
    for j, e in enumerate(expected):
        assert (logits[j] - e).abs().max() < TOL, f"draft token {j}"
    assert result.verify_token_ids == [[int(e.argmax()) for e in expected[:5]], [int(e.argmax()) for e in expected[5:]]]
    assert result.next_token_ids == [row[-1] for row in result.verify_token_ids]
    # Accept the first two chain tokens: roll the third back, then decode on top of the kept ones.
    table = worker.memory.req_to_token_pool
    release_kv_tail(table, worker.memory.allocator, rows[1], len(q) + 2, len(q) + 3)
    step = worker.launch(decode_batch(worker.memory, [rows[1]], [len(q) + 2], [77])).logits.next_token_logits
    assert (step[0].cpu() - hf_last(hf, q + chain[:2] + [77])[0]).abs().max() < TOL
    release(worker, rows, [len(p) + len(tree), len(q) + 3])


@pytest.mark.parametrize("backend", BACKENDS)
def test_idle_step_runs_and_returns_nothing(tiny, backend):
    path, hf = tiny
    worker = worker_for(path, backend)
    assert worker.run(Batch.idle()).next_token_ids == []
    rows = prefill(worker, [[3, 4, 5]])  # the worker is still fine
    step = worker.launch(decode_batch(worker.memory, rows, [3], [6])).logits.next_token_logits
    assert (step[0].cpu() - hf_last(hf, [3, 4, 5, 6])[0]).abs().max() < TOL
    release(worker, rows, [4])


@pytest.mark.parametrize("backend", ["torch_native", "cpu"])
def test_hidden_states_and_input_embeds(tiny, backend):
    """Rows ask for their final hidden states; a prompt whose positions 3..5 come as embeddings (not token ids)
    gets HF's logits for the same ``inputs_embeds``."""
    path, hf = tiny
    worker = worker_for(path, backend)
    ids = list(range(50, 62))
    embeds = torch.randn(3, hf.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.1
    rows = worker.memory.req_to_token_pool.alloc(2)
    batch = extend_batch(worker.memory, rows, [0, 0], [ids, ids])
    batch.return_hidden_states = True
    batch.input_embeds = [(len(ids) + 3, embeds)]  # the second row's positions 3..5
    result = worker.run(batch)
    logits, hidden = hf_last(hf, ids)
    assert (result.hidden_states[0] - hidden).abs().max() < TOL
    with torch.no_grad():
        full = hf.get_input_embeddings()(torch.tensor(ids)).clone()
    full[3:6] = embeds
    logits_e, hidden_e = hf_last(hf, ids, full)
    assert (result.hidden_states[1] - hidden_e).abs().max() < TOL
    assert result.next_token_ids == [int(logits.argmax()), int(logits_e.argmax())]
    release(worker, rows, [len(ids), len(ids)])


def test_a_backend_refuses_a_mode_it_lacks_before_any_layer_runs(tiny):
    """The check is one place (``init_forward_metadata``) with a message that names the mode and the fix."""
    path, _ = tiny
    worker = worker_for(path, "torch_native")
    backend = worker.runner.attn_backend
    backend.supported_modes = frozenset({ForwardMode.EXTEND, ForwardMode.DECODE})
    rows = prefill(worker, [[3, 4, 5]])
    batch = planned(worker, ForwardMode.MIXED, rows, [3], [[6]])
    with pytest.raises(UnsupportedForwardMode, match="does not run MIXED.*--attention-backend"):
        worker.launch(batch)
