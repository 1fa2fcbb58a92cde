"""``ModelWorker``: the executor side of the scheduler/executor contract.

The scheduler hands over a ``Batch`` and gets a ``BatchResult`` back.  A step has three moves so that the
overlap schedule can interleave them with host work:

    step = worker.launch(batch)             # enqueue the forward
    ...                                     # (the scheduler reads the previous step meanwhile)
    pending = worker.sample(step, mask)     # enqueue grammar masks, sampling, logprobs, the copy to the host
    result = pending.result()               # wait for this step only

``run`` does all three.  The worker keeps two things across steps: the last step's sampled ids on the device
(a later batch may name them by placeholder) and the sampling state of the current rows (penalty tables
advanced on the device; rebuilt when the scheduler's ``SamplingRows.epoch`` changes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from radixlm.constrained import TokenBitmask, apply_token_bitmask
from radixlm.core import Batch, BatchResult, ForwardBatch, ForwardMode
from radixlm.distributed.dp_attention import exchange_dp_step
from radixlm.executor.forward_batch import build_forward_batch
from radixlm.executor.model_runner import ModelRunner
from radixlm.layers.logits_processor import LogitsOutput
from radixlm.lora.adapter import LoRAAdapterError
from radixlm.lora.manager import LoRAManager
from radixlm.sampling import SamplingBatchInfo
from radixlm.sampling.logprobs import LogprobTensors


@dataclass
class LaunchedStep:
    """A step whose forward is enqueued and whose sampling is not."""

    batch: Batch
    forward_batch: ForwardBatch
    logits: LogitsOutput


@dataclass
class PendingResult:
    """A step's results on their way to the host; ``result()`` waits for this step only (an event after its
    copies, not the stream), so later work already enqueued keeps running."""

    next_ids: torch.Tensor  # [bs] (TARGET_VERIFY: [num_tokens]) int64, host (pinned on CUDA)
    output_logprobs: list[LogprobTensors | None] | None
    input_logprobs: list[LogprobTensors | None] | None
    hidden_states: torch.Tensor | None
    verify_lens: list[int] | None  # TARGET_VERIFY: new tokens per row
    ready: "torch.cuda.Event | None"  # None: already on the host

    def result(self) -> BatchResult:
        if self.ready is not None:
            self.ready.synchronize()
        ids = self.next_ids.tolist()
        verify = None
        if self.verify_lens is not None:
            verify, offset = [], 0
            for n in self.verify_lens:
                verify.append(ids[offset : offset + n])
                offset += n
            ids = [row[-1] for row in verify]
        return BatchResult(ids, _values(self.output_logprobs), _values(self.input_logprobs), self.hidden_states,
                           verify)


class ModelWorker:
    """Runs ``Batch``es on one tensor-parallel rank's ``ModelRunner``.

    ``memory`` (request rows and KV slots) is what the scheduler allocates from; ``model_config`` and
    ``tp_size`` are the facts about the model it needs.
    """

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.model_config = runner.model_config
        self.memory = runner.memory
        self.device = runner.device
        self.tp_size = runner.tp.size
        self._prev_ids: torch.Tensor | None = None  # [rows] sampled by the last step, on the device
        self._sampling_epoch: int | None = None
        self._sampling_info: SamplingBatchInfo | None = None

    def run(self, batch: Batch, grammar_mask: TokenBitmask | None = None) -> BatchResult:
        return self.sample(self.launch(batch), grammar_mask).result()

    def launch(self, batch: Batch) -> LaunchedStep:
        fb = build_forward_batch(batch, self.runner, self._prev_ids, self._dp_step(batch))
        fb.sampling_info = self._sampling_info_for(batch, fb)
        return LaunchedStep(batch, fb, self.runner.forward(fb))

    @torch.inference_mode()
    def sample(self, step: LaunchedStep, grammar_mask: TokenBitmask | None = None) -> PendingResult:
        """Enqueue ``grammar_mask`` (rows of the step's batch), sampling, the asked-for logprobs and hidden
        states, and their copy to the host."""
        batch, fb, out = step.batch, step.forward_batch, step.logits
        if batch.mode.is_idle:
            return PendingResult(torch.empty(0, dtype=torch.int64), None, None, None, None, None)
        if batch.mode is ForwardMode.TARGET_VERIFY:
            return self._verify(batch, out, grammar_mask)
        logits = out.next_token_logits  # [bs, vocab] float32
        if grammar_mask is not None:
            apply_token_bitmask(logits, grammar_mask)
        info = fb.sampling_info
        sampler = self.runner.sampler
        next_ids = sampler.argmax(logits) if info is None else sampler(logits, info)
        output_lp = self._output_logprobs(batch, logits, info, next_ids)
        input_lp = self._input_logprobs(batch, fb, out)
        if info is not None:
            info.update(next_ids)
        self._prev_ids = next_ids
        return self._to_host(next_ids, output_lp, input_lp, out.hidden_states, None)

    def memory_used_bytes(self) -> int:
        return self.runner.memory_used_bytes()

    def load_lora_adapter(self, name: str, path: str) -> dict:
        """Load the adapter at ``path`` as ``name`` on this rank ({"name", "rank", "target_modules"}: sorted
        module names); LoRAAdapterError, with nothing changed, for a bad adapter, a repeated name or a server
        without ``--enable-lora``."""
        adapter = self._lora_manager().load_adapter(name, path)
        return {"name": name, "rank": adapter.rank, "target_modules": sorted(adapter.target_modules)}

    def unload_lora_adapter(self, name: str) -> None:
        """Forget adapter ``name`` on this rank (KeyError if it is not loaded); no queued step may use it."""
        self._lora_manager().unload_adapter(name)

    def _lora_manager(self) -> LoRAManager:
        if self.runner.lora is None:
            raise LoRAAdapterError("LoRA adapters need a server started with --enable-lora")
        return self.runner.lora

    # ------------------------------------------------------------------ helpers
    def _dp_step(self, batch: Batch) -> tuple[list[int], bool] | None:
        """Data-parallel attention: every DP rank's token count this step and whether every rank's step is
        graph-compatible, the batch's or else exchanged with the other ranks (a gloo all-gather: every rank
        launches every step, IDLE ones too)."""
        dp = self.runner.dp
        if not dp.enabled:
            return None
        if batch.dp_token_counts is not None:
            return batch.dp_token_counts, batch.dp_all_decode
        return exchange_dp_step(batch.num_tokens, batch.graph_compatible, dp)

    def _sampling_info_for(self, batch: Batch, fb: ForwardBatch) -> SamplingBatchInfo | None:
        rows = batch.sampling
        if rows is None or batch.mode.is_idle:
            return None
        if rows.epoch == self._sampling_epoch and self._sampling_info is not None:
            return self._sampling_info
        cfg = self.model_config
        info = SamplingBatchInfo.from_requests(rows.params, rows.seeds, rows.prompt_ids, rows.output_ids,
                                               cfg.eos_token_ids, cfg.vocab_size, self.device)
        pending = torch.tensor([i < 0 for i in batch.input_ids])
        if batch.mode.is_decode and bool(pending.any()):
            # A placeholder input is an output token the host has not seen yet: count it like the others.
            info.update(fb.input_ids, None if bool(pending.all()) else pending.to(self.device, non_blocking=True))
        self._sampling_epoch, self._sampling_info = rows.epoch, info
        return info

    def _output_logprobs(self, batch: Batch, logits: torch.Tensor, info: SamplingBatchInfo | None,
                         next_ids: torch.Tensor) -> list[LogprobTensors | None] | None:
        """Per row that asked: the logprob of its sampled token in the distribution it was sampled from."""
        if batch.logprobs is None or all(o is None for o in batch.logprobs):
            return None
        dist = self.runner.sampler.logprobs(logits, info) if info is not None else logits.log_softmax(dim=-1)
        return [None if opts is None else LogprobTensors.of(dist[i : i + 1], next_ids[i : i + 1], opts)
                for i, opts in enumerate(batch.logprobs)]

    def _input_logprobs(self, batch: Batch, fb: ForwardBatch,
                        out: LogitsOutput) -> list[LogprobTensors | None] | None:
        """Per row with ``input_logprob_start``: the model's logprob of each prompt token at positions
        ``max(start, 1) .. prompt_len - 1`` that this step computes the logits for (row ``q`` scores ``q + 1``)."""
        if fb.extend_logits_start_cpu is None:
            return None
        assert batch.sampling is not None and batch.logprobs is not None, "prompt logprobs need the prompts"
        result: list[LogprobTensors | None] = []
        offset = 0
        for i, (start, prefix, ext, first_row) in enumerate(zip(
                batch.input_logprob_start, batch.prefix_lens, batch.extend_lens, fb.extend_logits_start_cpu)):
            prompt = batch.sampling.prompt_ids[i]
            lo = max(first_row, (start or 1) - 1 - prefix)  # first new-token row to score a wanted position
            hi = min(ext, len(prompt) - 1 - prefix)  # rows past the prompt's second-to-last token score nothing
            if start is None or lo >= hi:
                result.append(None)
            else:
                rows = out.input_token_logits[offset + lo - first_row : offset + hi - first_row]
                targets = prompt[prefix + lo + 1 : prefix + hi + 1]
                result.append(LogprobTensors.of(rows.log_softmax(dim=-1), targets, batch.logprobs[i]))
            offset += ext - first_row
        return result

    def _verify(self, batch: Batch, out: LogitsOutput, grammar_mask: TokenBitmask | None) -> PendingResult:
        """TARGET_VERIFY: the target model's greedy token after every draft token."""
        if grammar_mask is not None or (batch.sampling is not None and
                                        any(p.top_k != 1 for p in batch.sampling.params)):
            raise NotImplementedError("TARGET_VERIFY verifies greedily: sampled or grammar-constrained rows need "
                                      "speculative sampling, which lands with speculative decoding")
        ids = self.runner.sampler.argmax(out.next_token_logits)  # [num_tokens]
        self._prev_ids = None  # accepted tokens are chosen on the host; nothing names these rows
        return self._to_host(ids, None, None, None, list(batch.extend_lens))

    def _to_host(self, next_ids: torch.Tensor, output_lp: list[LogprobTensors | None] | None,
                 input_lp: list[LogprobTensors | None] | None, hidden: torch.Tensor | None,
                 verify_lens: list[int] | None) -> PendingResult:
        """Start every copy of the step's results to pinned host memory and record one event after them."""
        if hidden is not None:
            hidden = hidden.float()
        if self.device.type != "cuda":
            return PendingResult(next_ids, output_lp, input_lp, hidden, verify_lens, None)

        def copy(t: torch.Tensor) -> torch.Tensor:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            return host

        def copy_all(items: list[LogprobTensors | None] | None) -> list[LogprobTensors | None] | None:
            return None if items is None else [None if x is None else x.to(copy) for x in items]

        pending = PendingResult(copy(next_ids), copy_all(output_lp), copy_all(input_lp),
                                None if hidden is None else copy(hidden), verify_lens, torch.cuda.Event())
        pending.ready.record()
        return pending


def _values(items: list[LogprobTensors | None] | None) -> list | None:
    return None if items is None else [None if x is None else x.values() for x in items]
