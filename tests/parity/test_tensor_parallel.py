"""Tensor parallelism on CPU: two gloo ranks give the same logits and greedy tokens as one process."""

from __future__ import annotations

import gc
import glob
import time

import pytest
import torch
import torch.multiprocessing as mp

from radixlm.config import ServerArgs
from radixlm.core import Batch
from radixlm.distributed import destroy_tensor_parallel, free_local_addr
from radixlm.executor import ModelRunner, ModelWorker
from radixlm.executor.static_batch import extend_batch, generate_static, release
from radixlm.models.loader import resolve_model_config
from radixlm.sampling import SamplingParams

from conftest import build_tiny_fp8_model, build_tiny_hf_model

PROMPTS = [[5, 17, 99, 3, 250, 7, 7, 8], [400, 2, 33], list(range(100, 140))]


def run_rank(rank: int, tp_size: int, addr: str | None, model_path: str, load_format: str):
    """Prompt logits of one batched extend, and greedy continuations, with an IDLE step between them (every
    rank runs its layers' collectives on no tokens, and the ranks stay in step)."""
    torch.set_num_threads(1)
    args = ServerArgs(model_path=model_path, load_format=load_format, tp_size=tp_size, device="cpu",
                      dist_init_addr=addr, max_total_tokens=2048, random_seed=0, dtype="float32")
    worker = ModelWorker(ModelRunner(args, resolve_model_config(args), tp_rank=rank))
    try:
        rows = worker.memory.req_to_token_pool.alloc(len(PROMPTS))
        batch = extend_batch(worker.memory, rows, [0] * len(PROMPTS), PROMPTS)
        batch.input_logprob_start = [1] * len(PROMPTS)  # logits at every prompt token
        logits = worker.launch(batch).logits.input_token_logits.clone()
        release(worker, rows, [len(p) for p in PROMPTS])
        assert worker.run(Batch.idle()).next_token_ids == []
        tokens = generate_static(worker, PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True))
        return logits, tokens
    finally:
        destroy_tensor_parallel()


def gloo_threads(deadline_s: float = 10.0) -> list[str]:
    """gloo's worker threads still alive in this process (Linux) after waiting up to ``deadline_s`` for them to
    exit: the TCP loop thread leaves when the last reference to its device drops, which may be a moment after
    ``destroy_process_group`` returns (a garbage collection, a finished work object released late)."""
    deadline = time.monotonic() + deadline_s
    while True:
        names = [open(f).read().strip() for f in glob.glob("/proc/self/task/*/comm")]
        alive = [n for n in names if n.startswith(("pt_gloo", "gloo_"))]
        if not alive or time.monotonic() > deadline:
            return alive
        gc.collect()
        time.sleep(0.05)


def _rank_main(rank: int, tp_size: int, addr: str, model_path: str, load_format: str, queue) -> None:
    result = run_rank(rank, tp_size, addr, model_path, load_format)
    if rank == 0:
        logits, tokens = result
        queue.put((logits.numpy(), tokens))  # plain arrays: a shared-memory tensor dies with this process
    # Joined now, while the interpreter is alive: a worker still dropping a finished work's tensors during
    # interpreter shutdown cannot take the GIL and aborts the process (exit -6, one run in ~20).
    alive = gloo_threads()
    assert not alive, alive


def run_tp(tp_size: int, model_path: str, load_format: str):
    return spawn_ranks(_rank_main, tp_size, model_path, load_format)


def spawn_ranks(target, tp_size: int, *args):
    """Run ``target(rank, tp_size, addr, *args, queue)`` in ``tp_size`` spawned processes (``addr``: a free local
    rendezvous address) and return what rank 0 put on ``queue``; every process must exit cleanly."""
    addr = free_local_addr()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, tp_size, addr, *args, queue)) for r in range(tp_size)]
    for p in procs:
        p.start()
    try:
        result = queue.get(timeout=300)
    finally:
        for p in procs:
            p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return result


@pytest.mark.parametrize("name,load_format", [
    ("llama", "auto"),            # 4 heads / 2 KV heads: one KV head per rank
    ("mistral_sliding", "auto"),  # a single KV head, replicated on both ranks
    ("qwen3", "dummy"),           # seeded dummy weights must not depend on the TP size
    ("deepseek_v2_lora_yarn", "auto"),  # MLA: 2 of 4 heads per rank, the latent (q_a, kv_a) replicated
    ("deepseek_v3", "auto"),      # MoE: each expert's intermediate dim split, shared experts too, one all-reduce
    ("mixtral", "dummy"),         # MoE every layer, dummy expert weights identical for every TP size
])
def test_tp2_equals_tp1(name, load_format, tmp_path):
    build_tiny_hf_model(name, str(tmp_path))
    ref_logits, ref_tokens = run_rank(0, 1, None, str(tmp_path), load_format)
    logits, tokens = run_tp(2, str(tmp_path), load_format)
    assert tokens == ref_tokens
    assert (torch.from_numpy(logits) - ref_logits).abs().max().item() < 1e-4


def test_tp2_block_fp8_moe_equals_tp1(tmp_path):
    """A block-FP8 DeepSeek-V3 checkpoint (16 x 8 blocks): each rank takes whole scale blocks of the routed experts
    (intermediate 32: one 16-row block of gate and of up per rank), the shared experts and the attention
    projections, and quantizes the same activation groups as one process does (its slices start on group edges),
    so TP=2 differs from TP=1 by the all-reduce's summation order only: ~1e-6 per logit, except where that noise
    puts an activation on the other side of an E4M3 rounding boundary (one element moved by an fp8 ulp, 2^-3
    relative), which moves its token's logits by ~1e-3 (one row of the 51 here)."""
    build_tiny_fp8_model("deepseek_v3", str(tmp_path), block=(16, 8))
    ref_logits, ref_tokens = run_rank(0, 1, None, str(tmp_path), "auto")
    logits, tokens = run_tp(2, str(tmp_path), "auto")
    assert tokens == ref_tokens
    row_diff = (torch.from_numpy(logits) - ref_logits).abs().amax(dim=1)  # [rows]
    assert (row_diff > 1e-4).sum().item() <= 2 and row_diff.max().item() < 1e-2


def test_engine_tp3_equals_tp1():
    """The whole engine at TP=3 (three scheduler processes in lockstep, requests broadcast over the control group)
    gives the embedded model's greedy outputs at TP=1 (9 query heads and 3 KV heads: one KV head per rank)."""
    import radixlm

    prompts = ["The capital of France is", "def fibonacci(n):", "List three colors:"]
    outputs = {}
    for tp in (1, 3):
        with radixlm.Engine(tp_size=tp, dtype="float32", random_seed=0, max_total_tokens=4096) as engine:
            outs = engine.generate(prompts, {"max_new_tokens": 16, "temperature": 0})
            outputs[tp] = [o["output_ids"] for o in outs]
    assert outputs[3] == outputs[1]
