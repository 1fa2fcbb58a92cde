"""Decode steps replayed from CUDA graphs: one graph per captured batch size, a batch padded to the next size.

A decode step of a small model is a few hundred kernel launches whose CPU cost exceeds their GPU time; a graph
launches them all at once.  Every input of the captured forward lives in a static buffer that ``replay`` fills
(rows past the real batch are padding: token 0 at position 0 of request row 0, K/V written to the dummy slot
0, which the allocator never hands out), so the kernels recorded at capture read the current batch.  The
attention backend must therefore read nothing from the host in decode (the Triton backend; torch-native attention
sizes its tensors from host lengths and runs decode eagerly).

All graphs share one memory pool and are captured largest first, so the pool is sized by the largest batch
and the smaller graphs reuse it.

With LoRA (``runner.lora``) every size is captured twice: once without adapters (replayed for a batch in which no
row has one, so the base-only fast path launches no LoRA kernel in graphs either) and once with the adapter
layout as graph inputs: one segment per row (static ``seg_starts`` = 0, 1, ..., max_bs, the decode layout of
``LoRAManager.prepare``) and a static ``seg_slots`` filled per replay, padding rows -1.  The adapter pool's tensors
are the manager's, fixed for the runner's life, so the graphs read whatever adapters the slots hold.
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import TYPE_CHECKING

import torch

from radixlm.core import ForwardBatch, ForwardMode
from radixlm.kernels.lora import LoraSegments
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
    set is the MLP's gate/up output next to the residual stream) plus the float32 logits and their copies."""
    cfg, tp, kv = runner.model_config, runner.server_args.tp_size, runner.kv_spec
    elem = torch.empty((), dtype=cfg.dtype).element_size()
    heads = cfg.num_attention_heads // tp
    per_token = elem * (4 * cfg.hidden_size + 3 * (cfg.intermediate_size // tp) + heads * (kv.head_dim + kv.v_head_dim)
                        + kv.num_kv_heads * (kv.head_dim + kv.v_head_dim))
    per_token += 3 * 4 * cfg.vocab_size  # logits: bf16 matmul output, float32 copy, gathered copy
    per_token += 4 * cfg.vocab_size  # the shared float32 logits buffer
    if runner.lora is not None:  # the shrink's float32 intermediate, at most 16 K splits of 3 slices
        per_token += 16 * 3 * runner.lora.max_rank * 4
    return max_bs * per_token + (64 << 20)


def fill_lora_slots(static_slots: torch.Tensor, segments: LoraSegments, bs: int, padded: int) -> None:
    """Fill a LoRA decode graph's ``seg_slots`` input for a batch of ``bs`` rows replayed at size ``padded``:
    the batch's per-row slots, then -1 (no adapter) for the padding rows.  ``segments`` must be the one-segment-
    per-row decode layout (ValueError otherwise): its ``seg_starts`` are then 0..bs, the graph's static ones."""
    if segments.seg_slots.shape[0] != bs or segments.max_seg_len != 1:
        raise ValueError(f"a LoRA decode graph replays one one-token segment per row; got "
                         f"{segments.seg_slots.shape[0]} segments (max length {segments.max_seg_len}) for {bs} rows")
    if not bs <= padded <= static_slots.shape[0]:
        raise ValueError(f"{bs} rows padded to {padded} do not fit {static_slots.shape[0]} static slots")
    static_slots[:bs].copy_(segments.seg_slots)
    static_slots[bs:padded].fill_(-1)


class CudaGraphRunner:
    def __init__(self, runner: "ModelRunner", max_bs: int) -> None:
        self.runner = runner
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
        # LoRA's graph inputs: row i is segment i (tokens [i, i + 1)) of adapter slot lora_seg_slots[i]
        self.lora_seg_starts = torch.arange(self.max_bs + 1, dtype=torch.int32, device=device)
        self.lora_seg_slots = torch.full((self.max_bs,), -1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.lora_graphs: dict[int, torch.cuda.CUDAGraph] = {}  # empty without LoRA
        self._capture_all()

    def can_run(self, fb: ForwardBatch) -> bool:
        """Plain decode steps up to the largest captured size (no M-RoPE positions, embeddings or hidden
        states: the graphs were captured without them); with adapters, in the one-segment-per-row layout."""
        lora_ok = not _uses_lora(fb) or (fb.lora.seg_slots.shape[0] == fb.batch_size and fb.lora.max_seg_len == 1)
        return (fb.is_decode and fb.batch_size <= self.max_bs and fb.positions.dim() == 1
                and fb.embed_overrides is None and not fb.return_hidden_states and lora_ok)

    def replay(self, fb: ForwardBatch) -> LogitsOutput:
        bs = fb.batch_size
        padded = self.batch_sizes[bisect.bisect_left(self.batch_sizes, bs)]
        self.input_ids[:bs].copy_(fb.input_ids)
        self.positions[:bs].copy_(fb.positions)
        self.req_pool_indices[:bs].copy_(fb.req_pool_indices)
        self.seq_lens[:bs].copy_(fb.seq_lens)
        self.out_cache_loc[:bs].copy_(fb.out_cache_loc)
        if padded > bs:
            # Stale rows of an earlier, larger batch would write K/V into slots that are live again.
            self.input_ids[bs:padded].zero_()
            self.positions[bs:padded].zero_()
            self.req_pool_indices[bs:padded].zero_()
            self.seq_lens[bs:padded].fill_(1)
            self.out_cache_loc[bs:padded].zero_()
        if _uses_lora(fb):
            fill_lora_slots(self.lora_seg_slots, fb.lora, bs, padded)
            self.lora_graphs[padded].replay()
        else:
            self.graphs[padded].replay()
        return LogitsOutput(self.logits[:bs])

    # ------------------------------------------------------------------ capture
    def _static_batch(self, bs: int, lora: bool) -> ForwardBatch:
        r = self.runner
        segments = None
        if lora:  # has_lora: the captured forward runs the LoRA kernels, which read the slots at replay
            segments = LoraSegments(self.lora_seg_starts[:bs + 1], self.lora_seg_slots[:bs], 1, True)
        return ForwardBatch(
            forward_mode=ForwardMode.DECODE, batch_size=bs, input_ids=self.input_ids[:bs],
            positions=self.positions[:bs], req_pool_indices=self.req_pool_indices[:bs], seq_lens=self.seq_lens[:bs],
            seq_lens_cpu=[1] * bs, out_cache_loc=self.out_cache_loc[:bs],
            req_to_token_pool=r.memory.req_to_token_pool, kv_pool=r.kv_pool, attn_backend=r.attn_backend,
            lora=segments,
        )

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
            self.logits[:fb.batch_size].copy_(self.runner.forward_eager(fb).next_token_logits)
        return graph


def _uses_lora(fb: ForwardBatch) -> bool:
    """Whether some row of ``fb`` has an adapter (a host bool: no device read)."""
    return fb.lora is not None and fb.lora.has_lora
