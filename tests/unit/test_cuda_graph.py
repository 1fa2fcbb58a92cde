"""CUDA-graph decode: the captured batch sizes, and (on a GPU) replayed steps equal to eager ones."""

from __future__ import annotations

import pytest
import torch

from radixlm.executor.cuda_graph_runner import capture_batch_sizes, fill_lora_layout
from radixlm.kernels.lora import decode_layout, decode_segments
from radixlm.sampling import SamplingParams
from conftest import build_tiny_hf_model


def test_capture_batch_sizes() -> None:
    assert capture_batch_sizes(1) == [1]
    assert capture_batch_sizes(6) == [1, 2, 4, 6]
    assert capture_batch_sizes(8) == [1, 2, 4, 8]
    assert capture_batch_sizes(30) == [1, 2, 4, 8, 16, 24, 30]
    assert capture_batch_sizes(256)[-3:] == [240, 248, 256] and len(capture_batch_sizes(256)) == 35


def test_decode_lora_layouts() -> None:
    """Decode's LoRA layout for a graph's padded size: up to 16 rows one segment per row (padding rows slot -1);
    beyond, rows grouped by slot through token_order in pieces of 16, segments padded to the size's bound."""
    small = decode_segments([2, -1, 0], num_slots=4, device="cpu", rows=4)
    assert small.seg_starts.tolist() == [0, 1, 2, 3, 4] and small.seg_slots.tolist() == [2, -1, 0, -1]
    assert (small.max_seg_len, small.has_lora, small.token_order) == (1, True, None)
    slots = [i % 3 for i in range(20)]  # 0, 1, 2, 0, ...: 7 rows of slot 0, 7 of 1, 6 of 2, padded to 24 rows
    big = decode_segments(slots, num_slots=4, device="cpu", rows=24)
    assert decode_layout(24, 4) == (16, 6)
    assert big.token_order.tolist() == list(range(20, 24)) + list(range(0, 20, 3)) + list(range(1, 20, 3)) + list(
        range(2, 20, 3))
    assert big.seg_slots.tolist() == [-1, 0, 1, 2, -1, -1]
    assert big.seg_starts.tolist() == [0, 4, 11, 18, 24, 24, 24]
    assert big.max_seg_len == 16  # the grid bound of every batch of this size, whatever its pieces
    with pytest.raises(ValueError):
        decode_segments([0] * 5, num_slots=4, device="cpu", rows=4)


def test_fill_lora_layout() -> None:
    """A LoRA graph's static inputs take a layout of their own shape, refuse another size's."""
    static = decode_segments([-1] * 24, num_slots=4, device="cpu")
    static = static._replace(seg_starts=static.seg_starts.clone(), seg_slots=static.seg_slots.clone(),
                             token_order=static.token_order.clone())
    new = decode_segments([3] * 18, num_slots=4, device="cpu", rows=24)
    fill_lora_layout(static, new)
    assert torch.equal(static.seg_starts, new.seg_starts) and torch.equal(static.token_order, new.token_order)
    assert static.seg_slots.tolist() == new.seg_slots.tolist() == [-1, 3, 3, -1, -1, -1]
    with pytest.raises(ValueError, match="cannot replay"):
        fill_lora_layout(static, decode_segments([3] * 18, num_slots=4, device="cpu"))  # the 18-row shape
    with pytest.raises(ValueError, match="cannot replay"):
        fill_lora_layout(static, decode_segments([0] * 4, num_slots=4, device="cpu", rows=8))
    with pytest.raises(ValueError, match="cannot replay"):  # a dense layout in a graph captured without
        fill_lora_layout(static, decode_segments([3] * 18, num_slots=4, device="cpu", rows=24, dense=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_lora_graph_decode_matches_eager(tmp_path) -> None:
    """With LoRA, greedy tokens are identical with CUDA graphs and without: a batch mixing base-only rows and two
    adapters (replayed from the LoRA graphs, one segment per row), a batch of 20 such rows (padded to 24: rows
    grouped by adapter through token_order), then a base-only batch (the graphs without LoRA kernels)."""
    from radixlm.config import ServerArgs
    from radixlm.executor import ModelRunner, ModelWorker
    from radixlm.executor.static_batch import generate_static
    from radixlm.models.loader import resolve_model_config

    from tests.lora_helpers import build_peft_adapter

    hf = build_tiny_hf_model("llama", str(tmp_path / "model"))
    build_peft_adapter(hf, str(tmp_path / "a"), 8, 16, False, ["q_proj", "v_proj", "down_proj"], None, seed=1)
    build_peft_adapter(hf, str(tmp_path / "b"), 16, 16, True, "all-linear", None, seed=2)
    prompts = [[5, 17, 99, 3], [400, 2, 33], list(range(100, 140)), [7, 8], [9, 10, 11]]
    params = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
    outs = {}
    for disable in (False, True):
        args = ServerArgs(model_path=str(tmp_path / "model"), device="cuda", dtype="float32", max_total_tokens=4096,
                          random_seed=0, cuda_graph_max_bs=24, disable_cuda_graph=disable,
                          lora_paths=(f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}"))
        worker = ModelWorker(ModelRunner(args, resolve_model_config(args)))
        assert (worker.runner.cuda_graph_runner is None) == disable
        outs[disable] = (generate_static(worker, prompts, params, lora_names=["a", None, "b", "a", None]),
                         generate_static(worker, prompts, params, lora_names=[None] * 5),
                         generate_static(worker, prompts * 4, params, lora_names=["a", None, "b", "a", None] * 4))
    assert outs[False] == outs[True]
    assert outs[False][0][1] == outs[False][1][1] and outs[False][0][0] != outs[False][1][0]
    big = outs[False][2]  # rows i and i + 5 share prompt and adapter: the grouped layout scattered them right
    assert all(big[i] == big[i % 5] for i in range(20)) and big[0] != big[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("page_size", [1, 16])
def test_graph_decode_matches_eager(tmp_path, page_size: int) -> None:
    """Greedy tokens are identical with CUDA graphs and without, while the decode batch shrinks as requests of
    different lengths finish (every step padded to a captured size)."""
    from radixlm.config import ServerArgs
    from radixlm.core import Req
    from radixlm.executor import ModelRunner, ModelWorker
    from radixlm.models.loader import resolve_model_config
    from radixlm.scheduler import Scheduler, run_to_completion

    build_tiny_hf_model("llama", str(tmp_path))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (5, 17, 33, 3, 9, 60, 2, 11, 40, 7, 21)]
    outs = {}
    for disable in (False, True):
        args = ServerArgs(model_path=str(tmp_path), device="cuda", dtype="bfloat16", max_total_tokens=8192,
                          page_size=page_size, random_seed=0, cuda_graph_max_bs=16, disable_cuda_graph=disable)
        runner = ModelRunner(args, resolve_model_config(args))
        assert (runner.cuda_graph_runner is None) == disable
        reqs = [Req(rid=str(i), origin_input_ids=p, sampling_params=SamplingParams(
                    temperature=0, max_new_tokens=4 + 3 * i, ignore_eos=True)) for i, p in enumerate(prompts)]
        for r in reqs:
            r.sampling_params.normalize()
        run_to_completion(Scheduler(args, ModelWorker(runner)), reqs)
        outs[disable] = [r.output_ids for r in reqs]
    assert outs[False] == outs[True]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU scheduler path needs a GPU")
def test_gpu_schedules_agree(tmp_path) -> None:
    """On the GPU, in float32: the overlap schedule, mixed chunks, paged KV, eager decode and logprob requests
    change no greedy token (every step launched without reading device values on the host)."""
    from radixlm.core import Req
    from radixlm.sampling.logprobs import LogprobOptions, RequestLogprobs

    from conftest import make_scheduler
    from radixlm.scheduler import run_to_completion

    build_tiny_hf_model("llama", str(tmp_path))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (5, 70, 33, 3, 9, 120, 2, 11)]
    outs = {}
    for name, flags in {"default": {}, "no_overlap": dict(disable_overlap_schedule=True),
                        "mixed": dict(enable_mixed_chunk=True, chunked_prefill_size=32),
                        "paged": dict(page_size=16), "eager": dict(disable_cuda_graph=True)}.items():
        sched = make_scheduler(str(tmp_path), device="cuda", max_total_tokens=8192, cuda_graph_max_bs=8, **flags)
        reqs = [Req(rid=str(i), origin_input_ids=p, sampling_params=SamplingParams(
                    temperature=0, max_new_tokens=6 + 3 * i, ignore_eos=True)) for i, p in enumerate(prompts)]
        reqs[1].logprobs = RequestLogprobs(LogprobOptions(-1, 2), input_done=True)  # output logprobs only
        for r in reqs:
            r.sampling_params.normalize()
        run_to_completion(sched, reqs)
        outs[name] = [r.output_ids for r in reqs]
        assert len(reqs[1].logprobs.output_token_logprobs) == len(reqs[1].output_ids)
        assert [e[1] for e in reqs[1].logprobs.output_token_logprobs] == reqs[1].output_ids
    assert all(o == outs["default"] for o in outs.values()), outs


def test_replay_path_without_graphs_matches_eager(tmp_path) -> None:
    """The graph runner's padding and replay, run eagerly on CPU (``capture=False``): a decode step of 3 rows pads
    to 4 (dummy rows in slot 0) and gives the eager step's logits; steps no graph takes (past the largest size,
    an extend) are refused.  The scheduler's greedy tokens are those of eager decode."""
    from radixlm.core import ForwardMode
    from radixlm.executor.cuda_graph_runner import CudaGraphRunner
    from radixlm.executor.forward_batch import build_forward_batch
    from radixlm.executor.static_batch import decode_batch, extend_batch, release
    from radixlm.scheduler import run_to_completion

    from conftest import greedy_req, make_scheduler, make_worker, random_seqs

    build_tiny_hf_model("llama", str(tmp_path))
    worker = make_worker(str(tmp_path))
    runner = worker.runner
    graphs = CudaGraphRunner(runner, 8, capture=False)
    assert graphs.batch_sizes == [1, 2, 4, 8] and not graphs.graphs
    seqs = random_seqs((5, 9, 3))
    memory = worker.memory
    rows = memory.req_to_token_pool.alloc(3)
    try:
        prefill = extend_batch(memory, rows, [0, 0, 0], seqs)
        worker.launch(prefill)
        step = decode_batch(memory, rows, [len(s) for s in seqs], [7, 8, 9])
        fb = build_forward_batch(step, runner, None)
        assert graphs.padded_size(fb) == 4 and graphs.can_run(fb)
        assert not graphs.can_run(build_forward_batch(prefill, runner, None))
        eager = runner.forward_eager(build_forward_batch(step, runner, None)).next_token_logits
        replayed = graphs.replay(fb).next_token_logits
        assert replayed.shape == eager.shape and torch.allclose(replayed, eager, rtol=1e-5, atol=1e-5)
        too_big = fb.__class__(**{**fb.__dict__, "batch_size": 9})
        assert graphs.padded_size(too_big) is None and fb.forward_mode is ForwardMode.DECODE
    finally:
        release(worker, rows, [len(s) + 1 for s in seqs])
    outs, replays = {}, []
    for padded in (False, True):
        sched = make_scheduler(str(tmp_path))
        if padded:
            runner = sched.worker.runner
            runner.cuda_graph_runner = CudaGraphRunner(runner, 4, capture=False)
            replay = runner.cuda_graph_runner.replay
            runner.cuda_graph_runner.replay = lambda fb: replays.append(fb.batch_size) or replay(fb)
        reqs = [greedy_req(str(i), s, 5 + i) for i, s in enumerate(random_seqs((4, 11, 6, 2, 8), seed=3))]
        run_to_completion(sched, reqs)
        outs[padded] = [r.output_ids for r in reqs]
    assert outs[False] == outs[True]
    assert replays and max(replays) <= 4 and 3 in replays  # decode steps of 4 rows and fewer (3: padded)
