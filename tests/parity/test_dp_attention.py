"""Data-parallel attention on CPU (gloo, float32): every DP rank runs its own requests, the MLP/MoE layers all DP
ranks' tokens over the whole TP group, and each request's prompt logits and greedy tokens equal those of one
process (TP=1) running that DP rank's requests alone.

The ranks follow a static schedule known to all of them (``schedule``): a DP rank extends the requests that arrive
in a step, else decodes its running ones, else idles; a request leaves once it has its tokens.  So DP ranks run
different modes in one step (one extends while another decodes or idles), finish at different steps and idle to
the end, and the step's token counts (``Batch.dp_token_counts``, with ``dp_all_decode``: every rank decodes or
idles) follow from the plans without any exchange.

Steps in which every rank decodes or idles replay CUDA graphs on a GPU: every rank's rows padded to the graph's
size, an idle rank's all padding, the feed-forward over the padded rows.  On CPU the ``padded`` cases run that
replay path without graphs (``CudaGraphRunner(capture=False)``).  One process can play one DP rank of two whose
peer's rows it makes up (``PeerGroup``), which runs the captured graphs on a single GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from radixlm.config import ServerArgs
from radixlm.core import Batch
from radixlm.distributed import destroy_tensor_parallel, free_local_addr, parallel_state
from radixlm.distributed.parallel_state import DPAttention, TPGroup
from radixlm.executor import ModelRunner, ModelWorker, model_runner
from radixlm.executor import worker as worker_module
from radixlm.executor.cuda_graph_runner import CudaGraphRunner
from radixlm.executor.static_batch import decode_batch, extend_batch, release
from radixlm.models.loader import resolve_model_config

from conftest import build_tiny_hf_model, random_seqs

# Per DP rank: its requests (arrival step, prompt, new tokens).  Rank 0 extends two at once, and a third while
# its first still runs; rank 1 idles first, then extends in two steps and outlives rank 0 (which idles at the
# end); rank 2 never has a request; rank 3 one short request.  Ranks 2 and 3 run with --dp-size 4 only.
_P = random_seqs((9, 3, 6, 20, 2, 5), seed=7)
PLANS: list[list[tuple[int, list[int], int]]] = [
    [(0, _P[0], 4), (0, _P[1], 2), (2, _P[2], 2)],
    [(1, _P[3], 3), (2, _P[4], 4)],
    [],
    [(2, _P[5], 2)],
]

Step = tuple[str, list[int]]  # ("extend" | "decode" | "idle", request indices)


def schedule(plan: list[tuple[int, list[int], int]]) -> list[Step]:
    """The steps one DP rank runs for ``plan``: arrivals are extended in their step (the running requests wait),
    otherwise the running requests decode; a request leaves with its last token."""
    steps: list[Step] = []
    produced = [0] * len(plan)
    pending, running = list(range(len(plan))), []
    while pending or running:
        arriving = [i for i in pending if plan[i][0] <= len(steps)]
        if arriving:
            steps.append(("extend", arriving))
            pending = [i for i in pending if i not in arriving]
            running += arriving
        else:
            steps.append(("decode", list(running)) if running else ("idle", []))
        for i in steps[-1][1]:
            produced[i] += 1
        running = [i for i in running if produced[i] < plan[i][2]]
    return steps


def token_counts(plans: list[list[tuple[int, list[int], int]]]) -> list[tuple[list[int], bool]]:
    """Per step, every DP rank's new tokens (idle ranks 0, to the end of the longest schedule), and whether every
    rank decodes or idles."""
    schedules = [schedule(p) for p in plans]
    counts = []
    for t in range(max(len(s) for s in schedules)):
        row, all_decode = [], True
        for plan, steps in zip(plans, schedules):
            kind, reqs = steps[t] if t < len(steps) else ("idle", [])
            row.append(sum(len(plan[i][1]) for i in reqs) if kind == "extend" else len(reqs))
            all_decode &= kind != "extend"
        counts.append((row, all_decode))
    return counts


def run_plan(worker: ModelWorker, plan, counts: list[tuple[list[int], bool]] | None):
    """Run ``plan`` on ``worker`` step by step (``counts``: every DP rank's tokens per step and whether all
    decode or idle; None: alone, TP=1).  Returns per request its greedy tokens and its prompt logits
    [prompt_len, vocab]."""
    steps = schedule(plan)
    num_steps = len(steps) if counts is None else len(counts)
    outputs: list[list[int]] = [[] for _ in plan]
    logits: list[np.ndarray | None] = [None] * len(plan)
    rows: dict[int, int] = {}
    seq_lens: dict[int, int] = {}
    memory = worker.memory
    for t in range(num_steps):
        kind, reqs = steps[t] if t < len(steps) else ("idle", [])
        if kind == "extend":
            for i, row in zip(reqs, memory.req_to_token_pool.alloc(len(reqs))):
                rows[i], seq_lens[i] = row, len(plan[i][1])
            batch = extend_batch(memory, [rows[i] for i in reqs], [0] * len(reqs), [plan[i][1] for i in reqs])
            batch.input_logprob_start = [1] * len(reqs)  # logits at every prompt token
        elif kind == "decode":
            batch = decode_batch(memory, [rows[i] for i in reqs], [seq_lens[i] for i in reqs],
                                 [outputs[i][-1] for i in reqs])
            for i in reqs:
                seq_lens[i] += 1
        else:
            batch = Batch.idle()
        if counts is not None:
            batch.dp_token_counts, batch.dp_all_decode = counts[t]
        step = worker.launch(batch)
        tokens = step.logits.next_token_logits.argmax(dim=-1).tolist()  # greedy
        if kind == "extend":
            prompt_logits = step.logits.input_token_logits.split([len(plan[i][1]) for i in reqs])
            for i, rows_logits in zip(reqs, prompt_logits):
                logits[i] = rows_logits.cpu().numpy()
        for i, tok in zip(reqs, tokens):
            outputs[i].append(tok)
            if len(outputs[i]) == plan[i][2]:
                release(worker, [rows.pop(i)], [seq_lens.pop(i)])
    assert not rows, "every request finished"
    return outputs, logits


def _args(model_path: str, tp: int, dp: int, addr: str | None, device: str) -> ServerArgs:
    return ServerArgs(model_path=model_path, tp_size=tp, dp_size=dp, enable_dp_attention=dp > 1, device=device,
                      dist_init_addr=addr, max_total_tokens=2048, random_seed=0, dtype="float32")


def counting_replays(graphs: CudaGraphRunner) -> CudaGraphRunner:
    """``graphs`` with its replays counted in ``graphs.replays``."""
    graphs.replays, replay = 0, graphs.replay

    def counted(fb):
        graphs.replays += 1
        return replay(fb)

    graphs.replay = counted
    return graphs


def replay_path_without_graphs(runner: ModelRunner) -> CudaGraphRunner:
    """The graph runner's replay path without graphs (CPU), up to 4 rows, counting its replays."""
    return counting_replays(CudaGraphRunner(runner, 4, capture=False))


def _rank_main(rank: int, tp: int, device: str, cases: list[tuple[str, int, bool, str]], queue) -> None:
    """Every case (model path, dp size, padded, rendezvous address) in turn, on fresh process groups."""
    torch.set_num_threads(1)
    for index, (model_path, dp, padded, addr) in enumerate(cases):
        args = _args(model_path, tp, dp, addr, device)
        worker = ModelWorker(ModelRunner(args, resolve_model_config(args), tp_rank=rank))
        try:
            dp_rank = worker.runner.dp.rank
            assert worker.runner.dp.attn_tp.size == tp // dp and worker.runner.dp.size == dp
            if padded:
                worker.runner.cuda_graph_runner = replay_path_without_graphs(worker.runner)
            plans = PLANS[:dp]
            counts = token_counts(plans)
            result = run_plan(worker, plans[dp_rank], counts)
            if padded:  # every step in which all ranks decode or idle (and the largest fits 4 rows) replayed
                expected = sum(1 for row, all_decode in counts if all_decode and max(row) <= 4)
                assert worker.runner.cuda_graph_runner.replays == expected > 0
            queue.put((index, rank, dp_rank, result))
        finally:
            destroy_tensor_parallel()


def run_group(tp: int, device: str, cases: list[tuple[str, int, bool]]) -> dict[tuple[int, int], tuple]:
    """(case index, TP rank) -> (DP rank, (tokens, logits)) from ``tp`` spawned ranks (gloo on CPU, NCCL on
    CUDA)."""
    cases_with_addr = [(path, dp, padded, free_local_addr()) for path, dp, padded in cases]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, tp, device, cases_with_addr, queue)) for r in range(tp)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(tp * len(cases)):
            index, rank, dp_rank, result = queue.get(timeout=300)
            results[index, rank] = (dp_rank, result)
    finally:
        for p in procs:
            p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return results


def _gpus(n: int):
    return pytest.mark.skipif(torch.cuda.device_count() < n, reason=f"needs {n} GPUs")


@pytest.mark.parametrize("tp,dps,device", [
    (2, (2,), "cpu"),
    (4, (2, 4), "cpu"),
    pytest.param(4, (2, 4), "cuda", marks=_gpus(4)),  # NCCL attention groups, Triton attention and MoE kernels
])
def test_dp_attention_equals_tp1(tp, dps, device, tmp_path):
    """Tiny DeepSeek-V2 (softmax group-limited routing, q without LoRA) and V3 (sigmoid grouped routing, q LoRA,
    YaRN), each with a dense first layer: at TP=``tp`` with every --dp-size in ``dps``, each DP rank's requests
    get TP=1's tokens exactly and its prompt logits within float32 reduction-order noise; on CPU also with the
    decode steps through the graph runner's padded replay (on a GPU graphs replay them anyway)."""
    cases, references = [], []
    for name in ("deepseek_v2_moe", "deepseek_v3"):
        path = str(tmp_path / name)
        build_tiny_hf_model(name, path)
        args = _args(path, 1, 1, None, device)
        worker = ModelWorker(ModelRunner(args, resolve_model_config(args)))
        refs = [run_plan(worker, plan, None) for plan in PLANS[:max(dps)]]
        for dp in dps:
            for padded in (False, True) if device == "cpu" else (False,):
                cases.append((path, dp, padded))
                references.append(refs)
    results = run_group(tp, device, cases)
    # CUDA: the Triton kernels' float32 dots run in TF32, whose rounding the summation orders then spread further
    tolerance = 1e-4 if device == "cpu" else 1e-3
    for index, (path, dp, _) in enumerate(cases):
        for rank in range(tp):
            dp_rank, (tokens, logits) = results[index, rank]
            assert dp_rank == rank // (tp // dp)
            ref_tokens, ref_logits = references[index][dp_rank]
            assert tokens == ref_tokens, (path, dp, rank)
            for got, want in zip(logits, ref_logits):
                assert np.abs(got - want).max() < tolerance, (path, dp, rank)


@dataclass(frozen=True)
class PeerGroup(TPGroup):
    """The two-rank TP group of DP rank ``rank`` (one rank per attention group) in one process, the other rank's
    rows made up: the same rows (``mirror``: a DP rank running the same requests) or zeros (an IDLE rank, all
    padding).  Only the feed-forward's exchange (``all_gather``) is played; nothing else may use it."""

    mirror: bool = False

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        peer = x if self.mirror else torch.zeros_like(x)
        return torch.cat([x if r == self.rank else peer for r in range(self.size)], dim=dim)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the feed-forward reduces over the process's own TP group, not the DP exchange's")


@pytest.mark.parametrize("dp_rank,mirror", [(0, True), (0, False), (1, False)])
def test_one_process_plays_a_dp_rank(dp_rank, mirror, tmp_path, monkeypatch):
    """Tiny DeepSeek-V3 as DP rank ``dp_rank`` of two with a made-up peer (the same requests, or idle
    throughout): its tokens equal TP=1's and its prompt logits are within float32 noise of them, and every decode
    step replays at its padded size: on a GPU the CUDA graphs captured with the padded exchange, on CPU the
    replay path without graphs.  (The multi-process tests above need one GPU per rank for NCCL.)"""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = str(tmp_path / "deepseek_v3")
    build_tiny_hf_model("deepseek_v3", path)
    args = _args(path, 1, 1, None, device)
    plan = PLANS[0]
    want_tokens, want_logits = run_plan(ModelWorker(ModelRunner(args, resolve_model_config(args))), plan, None)

    dp = DPAttention(rank=dp_rank, size=2, attn_tp=TPGroup(), tp=PeerGroup(rank=dp_rank, size=2, mirror=mirror))

    def peer_counts(n: int) -> list[int]:
        return [n, n] if mirror else [n, 0][:: 1 - 2 * dp_rank]

    def init_with_peer(*_args, **_kwargs) -> TPGroup:
        monkeypatch.setattr(parallel_state, "_TP_GROUP", TPGroup())
        monkeypatch.setattr(parallel_state, "_DP_ATTENTION", dp)
        return parallel_state.get_tp_group()

    def exchange_with_peer(num_tokens: int, graph_compatible: bool, _dp) -> tuple[list[int], bool]:
        # the warm-up's steps (the test's own carry their counts)
        return peer_counts(num_tokens), graph_compatible

    monkeypatch.setattr(model_runner, "init_tensor_parallel", init_with_peer)
    monkeypatch.setattr(worker_module, "exchange_dp_step", exchange_with_peer)
    runner = ModelRunner(args, resolve_model_config(args))
    assert runner.dp is dp
    if device == "cpu":
        runner.cuda_graph_runner = replay_path_without_graphs(runner)
    else:
        assert runner.cuda_graph_runner.captured and runner.cuda_graph_runner.dp_attention
        counting_replays(runner.cuda_graph_runner)
    counts = []
    for kind, reqs in schedule(plan):
        n = sum(len(plan[i][1]) for i in reqs) if kind == "extend" else len(reqs)
        counts.append((peer_counts(n), kind != "extend"))
    tokens, logits = run_plan(ModelWorker(runner), plan, counts)
    assert tokens == want_tokens
    for got, want in zip(logits, want_logits):
        assert np.abs(got - want).max() < (1e-4 if device == "cpu" else 1e-3)
    assert runner.cuda_graph_runner.replays == sum(1 for _, all_decode in counts if all_decode) > 0
