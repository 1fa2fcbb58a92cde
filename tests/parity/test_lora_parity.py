"""Multi-LoRA batches against HF transformers + peft (issue #22's parity), in float32 on the embedded model: one
batch mixing base-only rows with three adapters of different ranks and targets (two rows of one adapter, rsLoRA,
an adapter on half the layers only) gives peft's logits (the prompt's last token, then decode steps) and peft's
greedy continuations; a base-only batch on a LoRA-enabled runner is bit-identical to a runner without LoRA; and
tensor parallelism (two gloo ranks) gives the one-process result with adapters."""

from __future__ import annotations

import pytest
import torch

from radixlm.config import ServerArgs
from radixlm.distributed import destroy_tensor_parallel
from radixlm.executor import ModelRunner, ModelWorker
from radixlm.executor.static_batch import decode_batch, extend_batch, generate_static, release
from radixlm.lora import manager as lora_manager
from radixlm.models.loader import resolve_model_config
from radixlm.sampling import SamplingParams

from conftest import build_tiny_hf_model, make_worker
from lora_helpers import build_peft_adapter
from test_tensor_parallel import gloo_threads, spawn_ranks

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> (r, lora_alpha, use_rslora, target_modules, layers_to_transform); the embedded model has 30 layers
ADAPTERS = {
    "all16": (16, 32, False, ALL, None),
    "qv4_rslora": (4, 8, True, ["q_proj", "v_proj"], None),
    "mlp_o8_half": (8, 8, False, ["o_proj", "gate_proj", "up_proj", "down_proj"], list(range(0, 30, 2))),
}
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "List three primary colors:",
    "Q: What is the boiling point of water?\nA:",
    "1, 2, 3, 5, 8, 13,",
]
# Row i runs under ROW_ADAPTERS[i]: two rows of one adapter side by side (one merged prefill segment), base rows
# between adapters.
ROW_ADAPTERS = ["all16", "all16", None, "qv4_rslora", "mlp_o8_half", None]
NEW_TOKENS = 12
DECODE_STEPS = 3
LOGIT_TOL = 1e-3  # fp32 on both sides, as for the base model (tests/parity/test_hf_parity.py)


@pytest.fixture(scope="module")
def peft_models(embedded_hf_model, tmp_path_factory) -> dict[str, tuple[str, torch.nn.Module]]:
    """Each adapter's directory and peft model (random A and B, spread 0.05: outputs change, stay fluent)."""
    root = tmp_path_factory.mktemp("lora_parity")
    out = {}
    for i, (name, (r, alpha, rslora, targets, layers)) in enumerate(ADAPTERS.items()):
        path = str(root / name)
        out[name] = (path, build_peft_adapter(embedded_hf_model, path, r, alpha, rslora, targets, layers, seed=i,
                                              std=0.05))
    return out


@pytest.fixture(scope="module", params=["segmented", "dense"])
def lora_worker(request, embedded_path, peft_models) -> ModelWorker:
    """Three slots for the three adapters, loaded at startup.  ``dense``: the GPU's decode path (the pool's A rows
    below the base weights, the shrink inside the base GEMM), forced on this CPU."""
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "dense":
            patch.setattr(lora_manager, "dense_decode", lambda device: True)
        worker = make_worker(embedded_path, lora_paths=tuple(f"{n}={p}" for n, (p, _) in peft_models.items()),
                             max_loras_per_batch=3)
    assert worker.runner.lora.dense == (request.param == "dense")
    return worker


def step_logits(worker: ModelWorker, prompts: list[list[int]], continuations: list[list[int]],
                lora_names: list[str | None] | None) -> list[torch.Tensor]:
    """Next-token logits [bs, vocab] of one batched extend of ``prompts``, then of ``DECODE_STEPS`` decode steps
    feeding ``continuations`` (the same tokens on both sides, whatever either samples)."""
    memory = worker.memory
    rows = memory.req_to_token_pool.alloc(len(prompts))
    seq_lens = [len(p) for p in prompts]
    try:
        batch = extend_batch(memory, rows, [0] * len(prompts), prompts)
        batch.lora_names = lora_names
        out = [worker.launch(batch).logits.next_token_logits.clone()]
        for step in range(DECODE_STEPS):
            batch = decode_batch(memory, rows, seq_lens, [c[step] for c in continuations])
            batch.lora_names = lora_names
            out.append(worker.launch(batch).logits.next_token_logits.clone())
            seq_lens = [s + 1 for s in seq_lens]
    finally:
        release(worker, rows, seq_lens)
    return out


def test_mixed_adapter_batch_matches_peft(lora_worker, embedded_hf_model, embedded_tokenizer, peft_models) -> None:
    prompts = [embedded_tokenizer(p).input_ids for p in PROMPTS]
    params = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    ours = generate_static(lora_worker, prompts, params, lora_names=ROW_ADAPTERS)
    logits = step_logits(lora_worker, prompts, ours, ROW_ADAPTERS)
    references = {None: embedded_hf_model, **{name: model for name, (_, model) in peft_models.items()}}
    for i, (ids, name, tokens) in enumerate(zip(prompts, ROW_ADAPTERS, ours)):
        with torch.no_grad():  # positions len(ids) - 1 onwards predict our tokens
            ref = references[name](torch.tensor([ids + tokens])).logits[0, len(ids) - 1:].float()
        # Greedy continuations equal: peft's argmax after every prefix of ours is our next token.
        assert ref[:NEW_TOKENS].argmax(dim=-1).tolist() == tokens, f"row {i} ({name})"
        for step, step_out in enumerate(logits):
            diff = (step_out[i] - ref[step]).abs().max().item()
            assert diff < LOGIT_TOL, f"row {i} ({name}) step {step}: logits differ by {diff}"
    # The adapters matter, and only on their rows: against the same batch without adapters, the adapter rows'
    # logits move and their continuations change (all16 rows); the base rows' logits are bit-identical (dense
    # decode steps: close, their base product comes from the GEMM over the extended weight, another kernel).
    base = step_logits(lora_worker, prompts, ours, None)
    dense = lora_worker.runner.lora.dense
    for i, name in enumerate(ROW_ADAPTERS):
        if name is None and dense:
            assert torch.equal(logits[0][i], base[0][i]), f"base row {i}"  # extend steps are not dense
            assert all((a[i] - b[i]).abs().max().item() < 1e-4 for a, b in zip(logits, base)), f"base row {i}"
        elif name is None:
            assert all(torch.equal(a[i], b[i]) for a, b in zip(logits, base)), f"base row {i}"
        else:
            assert (logits[0][i] - base[0][i]).abs().max().item() > 1.0, f"row {i} ({name})"
    base_tokens = generate_static(lora_worker, prompts[:2], params)
    assert ours[0] != base_tokens[0] and ours[1] != base_tokens[1]


def test_base_only_batch_is_unchanged_by_lora(lora_worker, embedded_worker, embedded_tokenizer) -> None:
    """No adapter in the batch, on a runner with adapters resident: bit-identical to the runner without LoRA
    (the layers take the base-only path: nothing is added)."""
    prompts = [embedded_tokenizer(p).input_ids for p in PROMPTS[:3]]
    continuations = [[11, 12, 13]] * 3
    assert lora_worker.runner.lora.resident  # the previous test left adapters in the slots
    without = step_logits(embedded_worker, prompts, continuations, None)
    for names in (None, [None] * 3):
        with_lora = step_logits(lora_worker, prompts, continuations, names)
        assert all(torch.equal(a, b) for a, b in zip(with_lora, without))


# ------------------------------------------------------------------------------------ tensor parallelism

TP_PROMPTS = [[5, 17, 99, 3, 250, 7, 7, 8], [400, 2, 33], list(range(100, 140)), [9, 9, 9, 9]]
TP_ADAPTERS = ["a", None, "b", "a"]


def _tp_rank_main(rank: int, tp_size: int, addr: str, model_path: str, paths: tuple[str, ...], dense: bool,
                  queue) -> None:
    torch.set_num_threads(1)
    if dense:  # the GPU's decode path, forced on this CPU
        lora_manager.dense_decode = lambda device: True
    args = ServerArgs(model_path=model_path, tp_size=tp_size, device="cpu", dist_init_addr=addr,
                      max_total_tokens=2048, random_seed=0, dtype="float32", lora_paths=paths,
                      max_loras_per_batch=2)
    try:
        worker = ModelWorker(ModelRunner(args, resolve_model_config(args), tp_rank=rank))
        tokens = generate_static(worker, TP_PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=8,
                                                                    ignore_eos=True), lora_names=TP_ADAPTERS)
        logits = step_logits(worker, TP_PROMPTS, tokens, TP_ADAPTERS)
    finally:
        destroy_tensor_parallel()
    if rank == 0:
        queue.put((torch.stack(logits).numpy(), tokens))  # plain arrays: a shared-memory tensor dies with us
    alive = gloo_threads()
    assert not alive, alive  # joined while the interpreter is alive (test_tensor_parallel)


def run_lora_tp(tp_size: int, model_path: str, paths: tuple[str, ...], dense: bool = False):
    return spawn_ranks(_tp_rank_main, tp_size, model_path, paths, dense)


@pytest.mark.parametrize("name,dense", [
    ("llama", False),            # 4 heads, 2 KV heads: one KV head per rank
    ("mistral_sliding", False),  # a single KV head, replicated on both ranks: both take all of k's and v's B
    ("llama", True),             # the dense decode over two ranks against the segmented one in one process
])
def test_tensor_parallel_adapters_match_one_process(tmp_path, name: str, dense: bool) -> None:
    """A tiny model split over two ranks: A of q/k/v/gate/up replicated and B split like the base weights, A of
    o/down split and added before the all-reduce (dense: each rank's partial shrink comes out of its partial base
    GEMM); same logits and tokens as TP=1."""
    hf = build_tiny_hf_model(name, str(tmp_path / "model"))
    build_peft_adapter(hf, str(tmp_path / "a"), 8, 16, False, ALL, None, seed=1)
    build_peft_adapter(hf, str(tmp_path / "b"), 4, 8, True, ["k_proj", "o_proj", "down_proj"], [1], seed=2)
    paths = (f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}")
    one_logits, one_tokens = run_lora_tp(1, str(tmp_path / "model"), paths)
    two_logits, two_tokens = run_lora_tp(2, str(tmp_path / "model"), paths, dense)
    assert two_tokens == one_tokens
    assert abs(two_logits - one_logits).max() < 1e-4
