"""Decode steps replayed from CUDA graphs: one graph per captured batch size, a batch padded to the next size.

A decode step of a small model is a few hundred kernel launches whose CPU cost exceeds their GPU time; a graph
launches them all at once.  Every input of the captured forward lives in a static buffer that ``replay`` fills
(rows past the real batch are padding: token 0 at position 0 of request row 0, K/V written to the dummy slot
0, which the allocator never hands out), so the kernels recorded at capture read the current batch.  The
attention backend must therefore read nothing from the host in decode (the Triton backend; torch-native attention
sizes its tensors from host lengths and runs decode eagerly).

All graphs share one memory pool and are captured largest first, so the pool is sized by the largest batch
and the smaller graphs reuse it.

Under data-parallel attention every forward is a collective of all DP ranks, so they replay graphs together or
not at all: a step replays when every DP rank's step is a graph-compatible decode or IDLE (``dp_all_decode``,
agreed in the scheduler's lockstep) and the largest rank's fits, every rank (an IDLE one too, all padding) at the
size that largest rank pads to.  The graphs were captured with the feed-forward's exchange over rows padded to
their size (``ForwardBatch.dp_padded_len``), so a replay reads no token count.

``capture=False`` pads and replays the same static batches eagerly, without graphs: the replay path on a CPU, for
the tests.

With LoRA (``runner.lora``) every size is captured twice: once without adapters (replayed for a batch in which no
row has one, so the base-only fast path launches no LoRA kernel in graphs either) and once with the adapter
layout as graph inputs: static ``seg_starts`` / ``seg_slots`` / ``token_order`` in the shape of
``radixlm.kernels.lora.decode_layout`` for the captured size, which ``LoRAManager.prepare`` gives a batch that a
graph of that size will replay (``padded_size``) and ``replay`` copies in.  The adapter pool's tensors are the
manager's, fixed for the runner's life, so the graphs read whatever adapters the slots hold.
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import TYPE_CHECKING

import torch

from radixlm.core import ForwardBatch, ForwardMode
from radixlm.kernels.lora import LoraSegments, decode_layout
from radixlm.layers.logits_processor import LogitsOutput

if TYPE_CHECKING:
    from radixlm.executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)


def capture_batch_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to ``max_bs`` (SGLang's spacing: padding wastes < 8 rows)."""
    sizes = [s for s in (1, 2, 4) if s < max_bs] + list(range(8, max_bs + 1, 8))
    if not sizes or sizes[-1] != max_bs:
        sizes.append(max_bs)
    return sorted(set(sizes))


def graph_memory_estimate(runner: "ModelRunner", max_bs: int) -> int:
    """Bytes the graph pool needs at batch ``max_bs``: the activations of one decode step (the largest live
    set is the MLP's gate/up output next to the residual stream) plus the float32 logits and their copies.
    Under DP attention a rank's attention has ``tp_size / dp_size`` ranks' heads, and its feed-forward runs on
    every DP rank's padded rows (``dp_size * max_bs``)."""
    args, cfg, kv = runner.server_args, runner.model_config, runner.kv_spec
    tp, dp = args.tp_size, args.dp_size if args.enable_dp_attention else 1
    elem = torch.empty((), dtype=cfg.dtype).element_size()
    heads = cfg.num_attention_heads // (tp // dp)
    per_token = elem * (3 * cfg.hidden_size + heads * (kv.head_dim + kv.v_head_dim)
                        + kv.num_kv_heads * (kv.head_dim + kv.v_head_dim))
    per_token += dp * elem * (cfg.hidden_size + 3 * (cfg.intermediate_size // tp))  # the feed-forward's rows
    per_token += 3 * 4 * cfg.vocab_size  # logits: bf16 matmul output, float32 copy, gathered copy
    per_token += 4 * cfg.vocab_size  # the shared float32 logits buffer
    if runner.lora is not None:  # the dense GEMM's output (base + every slot's shrink) beside the expand's
        per_token += elem * (3 * (cfg.intermediate_size // tp) + runner.lora.num_slots * 3 * runner.lora.max_rank)
    return max_bs * per_token + (64 << 20)


def fill_lora_layout(static: LoraSegments, segments: LoraSegments) -> None:
    """Copy a batch's decode layout into a LoRA graph's static inputs (ValueError unless the shapes and the
    segment bound are the captured ones: ``LoRAManager.prepare`` built it for another size)."""
    same = (segments.seg_slots.shape == static.seg_slots.shape and segments.max_seg_len == static.max_seg_len
            and segments.dense == static.dense
            and (segments.token_order is None) == (static.token_order is None)
            and (static.token_order is None or segments.token_order.shape == static.token_order.shape))
    if not same:
        raise ValueError(f"a LoRA decode graph of {static.seg_slots.shape[0]} segments (max length "
                         f"{static.max_seg_len}, dense {static.dense}) cannot replay a layout of "
                         f"{segments.seg_slots.shape[0]} (max length {segments.max_seg_len}, dense {segments.dense})")
    static.seg_starts.copy_(segments.seg_starts)
    static.seg_slots.copy_(segments.seg_slots)
    if static.token_order is not None:
        static.token_order.copy_(segments.token_order)


class CudaGraphRunner:
    def __init__(self, runner: "ModelRunner", max_bs: int, capture: bool = True) -> None:
        self.runner = runner
        self.dp_attention = runner.dp.enabled
        self.batch_sizes = capture_batch_sizes(max_bs)
        self.max_bs = self.batch_sizes[-1]
        device = runner.device
        self.input_ids = torch.zeros(self.max_bs, dtype=torch.int64, device=device)
        self.positions = torch.zeros(self.max_bs, dtype=torch.int64, device=device)
        self.req_pool_indices = torch.zeros(self.max_bs, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(self.max_bs, dtype=torch.int64, device=device)
        self.out_cache_loc = torch.zeros(self.max_bs, dtype=torch.int64, device=device)
        # Every graph ends by copying its logits here: a per-graph output would stay alive in the shared pool and
        # cost max_bs x vocab x 4 bytes for each captured size.
        self.logits = torch.empty(self.max_bs, runner.model_config.vocab_size, dtype=torch.float32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.lora_graphs: dict[int, torch.cuda.CUDAGraph] = {}  # empty without LoRA
        self.lora_layouts: dict[int, LoraSegments] = {}  # the LoRA graphs' static inputs, per size
        if runner.lora is not None:
            # LoRA's graph inputs, views per size of one set of buffers (all empty segments until a replay)
            num_segs = max(decode_layout(bs, runner.lora.num_slots)[1] for bs in self.batch_sizes)
            starts = torch.zeros(num_segs + 1, dtype=torch.int32, device=device)
            slots = torch.full((num_segs,), -1, dtype=torch.int32, device=device)
            order = torch.arange(self.max_bs, dtype=torch.int32, device=device)
            for bs in self.batch_sizes:
                split, n = decode_layout(bs, runner.lora.num_slots)
                self.lora_layouts[bs] = LoraSegments(starts[:n + 1], slots[:n], split or 1, True,
                                                     None if split is None else order[:bs], runner.lora.dense)
        self.captured = capture
        if capture:
            self._capture_all()

    def padded_size(self, fb: ForwardBatch) -> int | None:
        """The captured size that would replay ``fb`` (its decode rows padded up), None if no graph can: a plain
        decode step up to the largest captured size (no M-RoPE positions, embeddings or hidden states: the graphs
        were captured without them).  Under DP attention: the size of the DP rank with the most rows, when every
        rank's step is such a decode or IDLE, else None on every rank alike."""
        if self.dp_attention:
            counts = fb.dp_token_counts
            if not fb.dp_all_decode or not counts or not 0 < max(counts) <= self.max_bs:
                return None
            return self.batch_sizes[bisect.bisect_left(self.batch_sizes, max(counts))]
        if not (fb.is_decode and fb.batch_size <= self.max_bs and fb.positions.dim() == 1
                and fb.embed_overrides is None and not fb.return_hidden_states):
            return None
        return self.batch_sizes[bisect.bisect_left(self.batch_sizes, fb.batch_size)]

    def can_run(self, fb: ForwardBatch) -> bool:
        """``padded_size`` has a graph for ``fb``; with adapters, their layout is that size's."""
        padded = self.padded_size(fb)
        if padded is None:
            return False
        if not _uses_lora(fb):
            return True
        static = self.lora_layouts[padded]
        return fb.lora.seg_slots.shape == static.seg_slots.shape and fb.lora.max_seg_len == static.max_seg_len

    def replay(self, fb: ForwardBatch) -> LogitsOutput:
        bs = fb.batch_size
        padded = self.padded_size(fb)
        # One launch for the five copies (five copies cost a batch-1 step ~4 us of GPU time and their gaps, run T1)
        torch._foreach_copy_([self.input_ids[:bs], self.positions[:bs], self.req_pool_indices[:bs],
                              self.seq_lens[:bs], self.out_cache_loc[:bs]],
                             [fb.input_ids, fb.positions, fb.req_pool_indices, fb.seq_lens, fb.out_cache_loc])
        if padded > bs:
            # Stale rows of an earlier, larger batch would write K/V into slots that are live again.
            self.input_ids[bs:padded].zero_()
            self.positions[bs:padded].zero_()
            self.req_pool_indices[bs:padded].zero_()
            self.seq_lens[bs:padded].fill_(1)
            self.out_cache_loc[bs:padded].zero_()
        lora = _uses_lora(fb)
        if lora:
            fill_lora_layout(self.lora_layouts[padded], fb.lora)
        if not self.captured:  # eagerly: the host-reading attention backends get the real lengths
            self._run_static(self._static_batch(padded, lora, fb.seq_lens_cpu + [1] * (padded - bs)))
        elif lora:
            self.lora_graphs[padded].replay()
        else:
            self.graphs[padded].replay()
        return LogitsOutput(self.logits[:bs])

    # ------------------------------------------------------------------ capture
    def _static_batch(self, bs: int, lora: bool, seq_lens_cpu: list[int] | None = None) -> ForwardBatch:
        r = self.runner
        # has_lora: the captured forward runs the LoRA kernels, which read the layout's buffers at replay
        segments = self.lora_layouts[bs] if lora else None
        return ForwardBatch(
            forward_mode=ForwardMode.DECODE, batch_size=bs, input_ids=self.input_ids[:bs],
            positions=self.positions[:bs], req_pool_indices=self.req_pool_indices[:bs], seq_lens=self.seq_lens[:bs],
            seq_lens_cpu=seq_lens_cpu or [1] * bs, out_cache_loc=self.out_cache_loc[:bs],
            req_to_token_pool=r.memory.req_to_token_pool, kv_pool=r.kv_pool, attn_backend=r.attn_backend,
            lora=segments, dp_padded_len=bs if self.dp_attention else None,
        )

    def _run_static(self, fb: ForwardBatch) -> None:
        """What a graph of ``fb``'s size records: the forward over the static buffers, its logits copied out."""
        self.logits[:fb.batch_size].copy_(self.runner.forward_eager(fb).next_token_logits)

    def _capture_all(self) -> None:
        start, free_before = time.perf_counter(), torch.cuda.mem_get_info(self.runner.device)[0]
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.runner.device)
        variants = [(False, self.graphs)] + ([(True, self.lora_graphs)] if self.runner.lora is not None else [])
        for bs in reversed(self.batch_sizes):
            for lora, graphs in variants:
                graphs[bs] = self._capture(self._static_batch(bs, lora), pool, stream)
        torch.cuda.synchronize(self.runner.device)
        # The warm-up runs' blocks are cached for the side stream, where nothing will reuse them.
        torch.cuda.empty_cache()
        used = free_before - torch.cuda.mem_get_info(self.runner.device)[0]
        logger.info("CUDA graphs: %d batch sizes (1..%d)%s captured in %.1f s, %.2f GiB", len(self.batch_sizes),
                    self.max_bs, ", with and without LoRA," if self.lora_graphs else "", time.perf_counter() - start,
                    used / 2**30)

    def _capture(self, fb: ForwardBatch, pool: tuple, stream: torch.cuda.Stream) -> torch.cuda.CUDAGraph:
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: Triton compiles and autotunes outside the capture
                self.runner.forward_eager(fb)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (NCCL's watchdog, grammar workers) during the capture are
        # theirs, not an error that invalidates it
        with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            self._run_static(fb)
        return graph


def _uses_lora(fb: ForwardBatch) -> bool:
    """Whether some row of ``fb`` has an adapter (a host bool: no device read)."""
    return fb.lora is not None and fb.lora.has_lora
