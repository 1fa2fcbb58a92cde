"""The scheduler: continuous batching over a radix prefix cache, speaking to the executor through ``Batch``es.

Each ``step()`` plans one model step (a prefill of newly admitted requests, MIXED with the running requests'
decode rows under ``--enable-mixed-chunk``, or a decode of every running request), runs it on the executor and
turns its result into request progress.  Memory never runs out: admission reserves room for future decode
tokens, and when decode still cannot grow, the requests with the least progress are retracted to the waiting
queue (their computed KV goes to the radix cache) and resumed later with identical results (sampling randomness
is keyed by request seed and output position).

The managers own one concern each: ``PrefillManager`` the waiting queue and admission, ``DecodeManager`` the
running batch and retraction, ``GrammarQueue`` the requests whose grammar compiles; ``plan_step`` writes the
``Batch``.  The executor is anything with ``launch``/``sample`` and a ``KVMemory`` (``ModelWorker``, or a fake
one in the model-free tests).

Under data-parallel attention each DP rank runs a scheduler of its own requests, and ``DPLockstep`` keeps the ranks'
steps in step: a rank without a plan launches an IDLE batch when another rank has one (``step``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

from radixlm.cache import RadixCache
from radixlm.config import ServerArgs
from radixlm.constrained import GrammarBackend, GrammarSpec, TokenBitmask, accept_token, warm_up_grammar_masks
from radixlm.core import Batch, BatchResult, ForwardMode, Req, ReqState, new_epoch
from radixlm.lora import LoRAAdapterError
from radixlm.mem import KVMemory
from radixlm.scheduler.decode import DecodeManager
from radixlm.scheduler.dp_lockstep import DPLockstep
from radixlm.scheduler.grammar import GrammarQueue
from radixlm.scheduler.plan import PlannedStep, plan_step
from radixlm.scheduler.prefill import PrefillManager
from radixlm.scheduler.stats import LoadMark, SchedulerStats


class Executor(Protocol):
    """What the scheduler needs from the executor (``radixlm.executor.ModelWorker``)."""

    model_config: Any  # context_length, vocab_size, eos_token_ids, model_path
    memory: KVMemory
    tp_size: int
    device: Any

    def launch(self, batch: Batch) -> Any: ...
    def unload_lora_adapter(self, name: str) -> None: ...
    def sample(self, step: Any, grammar_mask: TokenBitmask | None) -> Any: ...  # .result() -> BatchResult
    def memory_used_bytes(self) -> int: ...


@dataclass
class _InFlight:
    """A step whose tokens are sampled on the device and not yet read (overlap schedule)."""

    step: PlannedStep
    pending: Any  # .result() -> BatchResult


class Scheduler:
    """``lockstep``: this DP rank's side of data-parallel attention's step exchange; None without DP attention."""

    def __init__(self, server_args: ServerArgs, worker: Executor, lockstep: DPLockstep | None = None):
        self.args = server_args
        self.worker = worker
        self.memory = worker.memory
        cfg = worker.model_config
        self.tree_cache = RadixCache(self.memory.req_to_token_pool, self.memory.allocator, self.memory.page_size,
                                     disable=server_args.disable_radix_cache)
        self.prefill = PrefillManager(server_args, self.memory, self.tree_cache)
        self.decode = DecodeManager(server_args, self.memory, self.tree_cache)
        backend = None
        if server_args.grammar_backend == "xgrammar" and not server_args.skip_tokenizer_init:
            backend = GrammarBackend(server_args.tokenizer_path or cfg.model_path, cfg.vocab_size, cfg.eos_token_ids,
                                     compile_timeout=server_args.grammar_compile_timeout)
            warm_up_grammar_masks(cfg.vocab_size, worker.device)
        # The ranks that must admit a constrained request in the same step: this DP rank's attention group
        lockstep_ranks = lockstep.attn_size if lockstep is not None else worker.tp_size
        self.grammars = GrammarQueue(backend, cfg.vocab_size, lockstep_ranks, worker.device.type == "cuda")
        self.lockstep = lockstep
        self.dp_rank = lockstep.dp_rank if lockstep is not None else 0
        self.overlap = not server_args.disable_overlap_schedule
        self.mixed_chunk = server_args.enable_mixed_chunk
        self.inflight: _InFlight | None = None
        self._decode_turn = False  # without mixed chunks, alternate a chunked prefill with decode steps
        self.num_generated_tokens = 0  # lifetime total; stats() turns it into a rate

    @property
    def waiting(self) -> list[Req]:
        return self.prefill.waiting

    @property
    def running(self) -> list[Req]:
        return self.decode.running

    @property
    def chunked_req(self) -> Req | None:
        return self.prefill.chunked_req

    # ------------------------------------------------------------------ requests in and out
    def add_request(self, req: Req) -> None:
        """Queue a request; one that can never fit finishes at once with an abort reason."""
        ctx = self.worker.model_config.context_length
        req.eos_token_ids = frozenset(self.worker.model_config.eos_token_ids)
        req.max_context_len = min(ctx, self.memory.max_total_num_tokens)
        req.created_time = req.created_time or time.time()
        if not req.origin_input_ids:
            req.finish({"type": "abort", "message": "the prompt is empty"})
        elif len(req.origin_input_ids) >= ctx:
            req.finish({"type": "abort", "message": f"the prompt has {len(req.origin_input_ids)} tokens; the "
                        f"context length is {ctx}"})
        elif len(req.origin_input_ids) + 1 > self.memory.max_total_num_tokens:
            req.finish({"type": "abort", "message": "the prompt does not fit the KV cache "
                        f"({self.memory.max_total_num_tokens} tokens)"})
        elif (spec := GrammarSpec.of(req.sampling_params)) is not None:
            self.grammars.add(req, spec)
        else:
            req.move_to(ReqState.WAITING)
            self.waiting.append(req)

    def abort_request(self, rid: str) -> Req | None:
        """Finish request ``rid`` wherever it is and return its memory; returns the request if found."""
        req = self.grammars.remove(rid) or self.prefill.remove(rid)
        if req is None:
            holders = self.running + ([self.chunked_req] if self.chunked_req else [])
            req = next((r for r in holders if r.rid == rid), None)
        if req is not None:
            req.finish({"type": "abort", "message": "aborted"})
            self._release([req])
        return req

    def unload_lora_adapter(self, name: str) -> None:
        """Free adapter ``name`` in the executor and its radix-cache namespace (a later adapter of that name must
        not reuse this one's KV).  RuntimeError, nothing changed, while a request of it is still here;
        LoRAAdapterError when it is not loaded."""
        holders = (self.waiting + self.running + [r for r, _ in self.grammars.pending]
                   + ([self.chunked_req] if self.chunked_req else []))
        using = [r.rid for r in holders if r.lora_name == name]
        if using:
            raise RuntimeError(f"LoRA adapter {name!r} still has requests in the scheduler: {using[:4]}")
        try:
            self.worker.unload_lora_adapter(name)
        except KeyError:
            raise LoRAAdapterError(f"LoRA adapter {name!r} is not loaded") from None
        self.tree_cache.drop_namespace(name)

    def is_idle(self) -> bool:
        return not (self.waiting or self.running or self.chunked_req or self.grammars or self.inflight)

    def may_wait_for_requests(self) -> bool:
        """Whether the loop may block until a request arrives: this scheduler is idle and, under DP attention,
        every DP rank was at the last step (a busy rank would otherwise wait for this one in the next step)."""
        return self.is_idle() and (self.lockstep is None or self.lockstep.all_idle)

    # ------------------------------------------------------------------ the loop body
    def step(self) -> list[Req]:
        """Run one model step; returns the requests that got a token or finished in it.

        Under DP attention every rank calls ``DPLockstep.sync`` once per step, whatever it planned: the forward
        is a collective of all DP ranks, so a rank without a plan launches an IDLE batch when any rank has one
        (never sampled: it has no rows)."""
        # Nothing but grammars to wait for: a short wait instead of a spin, unless another DP rank is busy
        idle = not (self.waiting or self.running or self.chunked_req) and (self.lockstep is None or
                                                                           not self.lockstep.forward_ran)
        ready, failed = self.grammars.poll(idle=idle)
        for req in ready:
            req.move_to(ReqState.WAITING)
            self.waiting.append(req)
        # With a step in flight that cannot be chained, admission, retraction or a new batch need the real state:
        # read it first, launching nothing of this rank's now.
        planned = None if self.inflight is not None and not self._can_chain() else self._plan()
        batch = planned.batch if planned is not None else None
        if self.lockstep is not None:
            # Idle: no plan and no work (admitted requests are in neither queue until the step is processed).
            dp_step = self.lockstep.sync(batch.num_tokens if batch is not None else None,
                                         batch is None and self.is_idle(), batch is None or batch.graph_compatible)
            if dp_step is not None:
                batch = batch or Batch.idle()
                batch.dp_token_counts, batch.dp_all_decode = dp_step
        if batch is None:
            return failed + self._finish_inflight()
        launched = self.worker.launch(batch)
        updated = failed + self._finish_inflight()  # read the previous step while this one's forward runs
        if planned is None:
            return updated
        pending = self.worker.sample(launched, self.grammars.bitmask(planned.reqs))
        if all(r.finished for r in planned.reqs):
            # Nothing will read this step: the GPU writes its KV into freed slots before any later batch can
            # reuse them (one stream, in order).
            return updated
        if self.overlap and planned.batch.mode.is_decode:
            self.inflight = _InFlight(planned, pending)
            return updated
        return updated + self._process(planned, pending.result())

    def _plan(self) -> PlannedStep | None:
        """The next step: a chained decode while one is in flight; else a prefill when something can be admitted
        (without mixed chunks, alternating with decode while a long prompt is chunked); else a decode."""
        if self.inflight is not None:
            return self._plan_decode(chained=True)
        if self.mixed_chunk or not (self.chunked_req and self.running and self._decode_turn):
            decode_rows = len(self.running) if self.mixed_chunk else 0
            admitted = self.prefill.admit(self.running, self.decode.new_token_ratio, decode_rows)
            if admitted:
                self._decode_turn = True
                return self._plan_prefill(admitted)
        self._decode_turn = False
        return self._plan_decode(chained=False) if self.running else None

    def _plan_prefill(self, admitted: list[Req]) -> PlannedStep:
        """EXTEND of the admitted requests, or MIXED with one decode row per running request when mixed chunks
        are on and the pool has room for both (else the decode rows wait for the next step)."""
        page = self.memory.page_size
        need = sum(-(-(r.kv_len + r.extend_len) // page) - -(-r.kv_len // page) for r in admitted) * page
        decode = list(self.running) if self.mixed_chunk else []
        if decode and not self._ensure_free(need + self.decode.slots_needed()):
            decode = []
        if not decode:
            self._ensure_free(need)
        mode = ForwardMode.MIXED if decode else ForwardMode.EXTEND
        return plan_step(mode, admitted, decode, self.memory, new_epoch())

    def _plan_decode(self, chained: bool) -> PlannedStep | None:
        """A decode step of every running request (None when retraction left none).  ``chained``: planned with
        the previous step in flight, whose samples are this step's inputs (room is checked by ``_can_chain``)."""
        if not chained:
            self.decode.make_room(self.waiting)
            if not self.running:
                return None
        prev = self.inflight.step.reqs if chained else None
        return plan_step(ForwardMode.DECODE, [], list(self.running), self.memory, self.decode.epoch, prev)

    def _can_chain(self) -> bool:
        """Whether the next decode step may be launched before the one in flight is read: its requests or some
        of them (others finished), no prompt to prefill or request to admit, and room for one more token each
        without eviction or retraction."""
        if not self.overlap or not self.running or self.chunked_req is not None:
            return False
        launched = set(map(id, self.inflight.step.reqs))
        if not all(id(r) in launched for r in self.running):
            return False
        return self.decode.has_room() and not self.prefill.could_admit(self.running, self.decode.new_token_ratio)

    def _finish_inflight(self) -> list[Req]:
        flight, self.inflight = self.inflight, None
        return self._process(flight.step, flight.pending.result()) if flight is not None else []

    # ------------------------------------------------------------------ results
    def _process(self, step: PlannedStep, result: BatchResult) -> list[Req]:
        """Turn a step's result into progress: prompt chunks into the radix cache, new tokens, logprobs, hidden
        states, grammar advances, finished requests released.  A request that finished or was aborted after the
        step was launched drops its token (its KV is already accounted)."""
        updated = []
        for i, req in enumerate(step.reqs):
            if req.finished:
                continue
            if i < step.num_prefill:
                if req.logprobs is not None and result.input_logprobs is not None:
                    self._record_input_logprobs(req, step.batch.prefix_lens[i], result.input_logprobs[i])
                # Into the tree right away, so requests sharing this prompt reuse it while this one decodes.
                self.tree_cache.cache_unfinished_req(req)
                if req.kv_len < req.seq_len:  # more chunks to come: the sampled token is meaningless
                    continue
                if req is self.prefill.chunked_req:
                    self.prefill.chunked_req = None
                if req.sampling_params.max_new_tokens == 0:  # prefill only (e.g. to cache a prompt shared by n > 1)
                    req.finish({"type": "length", "length": 0})
                    updated.append(req)
                    continue
                self.decode.add(req)
            updated.append(req)
            req.output_ids.append(result.next_token_ids[i])
            self.num_generated_tokens += 1
            if result.output_logprobs is not None and result.output_logprobs[i] is not None:
                req.logprobs.record(result.output_logprobs[i], output=True)
            if result.hidden_states is not None and req.return_hidden_states:
                req.hidden_states.append(result.hidden_states[i])
            accept_token(req, result.next_token_ids[i])
            req.check_finished()
        if step.num_prefill < len(step.reqs):
            self.decode.decay_reserve()
        self._release([r for r in updated if r.finished])
        return updated

    @staticmethod
    def _record_input_logprobs(req: Req, prefix_len: int, values: Any) -> None:
        lp, prompt = req.logprobs, req.origin_input_ids
        if lp.input_done:
            return
        if lp.options.input_start(len(prompt)) == 0 and prefix_len == 0:
            lp.record_input_first(prompt[0])  # position 0 has no context: its logprob is None
        if values is not None:
            lp.record(values, output=False)
        if req.kv_len >= len(prompt):
            lp.input_done = True

    # ------------------------------------------------------------------ memory
    def _ensure_free(self, num_slots: int) -> bool:
        """Evict cached prefixes until ``num_slots`` KV slots are free; False if that is not possible."""
        allocator = self.memory.allocator
        short = num_slots - allocator.available_size()
        if short > 0:
            self.tree_cache.evict(short)
        return allocator.available_size() >= num_slots

    def _release(self, reqs: list[Req]) -> None:
        """Hand finished or aborted requests' KV to the cache and drop them from the batch."""
        for req in reqs:
            if req.req_pool_idx is not None:
                self.tree_cache.cache_finished_req(req)
            if req is self.prefill.chunked_req:
                self.prefill.chunked_req = None
        self.decode.remove(reqs)

    # ------------------------------------------------------------------ reports
    def state(self) -> dict[str, int | float]:
        """Live load and memory numbers (``/get_server_info``).  ``available + cached == max_total`` when idle."""
        total = self.memory.max_total_num_tokens
        available, evictable = self.memory.allocator.available_size(), self.tree_cache.evictable_size()
        return {
            "num_running_reqs": len(self.running) + (self.chunked_req is not None),
            "num_waiting_reqs": len(self.waiting),
            "num_waiting_tokens": sum(len(r.origin_input_ids) for r in self.waiting),  # prompts not yet admitted
            "num_grammar_queue_reqs": len(self.grammars),
            "max_total_num_tokens": total,
            "available_kv_tokens": available,
            "cached_kv_tokens": self.tree_cache.total_size(),
            "evictable_kv_tokens": evictable,
            "protected_kv_tokens": self.tree_cache.protected_size(),
            "token_usage": round(1.0 - (available + evictable) / total, 4),
            "num_retracted_reqs": self.decode.num_retracted,
        }

    def load_mark(self) -> LoadMark:
        return LoadMark(time.monotonic(), self.num_generated_tokens, self.prefill.admitted_input_tokens,
                        self.prefill.admitted_cached_tokens)

    def stats(self, since: LoadMark) -> SchedulerStats:
        """Load, memory and totals for metrics and the load log; throughput and cache hit rate since ``since``."""
        now = self.load_mark()
        state = self.state()
        admitted = now.admitted_input - since.admitted_input
        return SchedulerStats(
            num_running_reqs=state["num_running_reqs"], num_queue_reqs=state["num_waiting_reqs"],
            num_grammar_queue_reqs=state["num_grammar_queue_reqs"],
            num_used_tokens=state["max_total_num_tokens"] - state["available_kv_tokens"]
            - state["evictable_kv_tokens"],
            token_usage=state["token_usage"], max_total_num_tokens=state["max_total_num_tokens"],
            gen_throughput=(now.generated - since.generated) / max(now.time - since.time, 1e-6),
            cache_hit_rate=(now.admitted_cached - since.admitted_cached) / admitted if admitted else 0.0,
            gpu_memory_used_bytes=self.worker.memory_used_bytes(),
            num_retracted_reqs_total=self.decode.num_retracted,
            evicted_tokens_total=self.tree_cache.num_evicted_tokens,
            dp_rank=self.dp_rank,
        )


def run_to_completion(scheduler: Scheduler, reqs: list[Req], max_steps: int = 1_000_000) -> list[Req]:
    """Add ``reqs`` and step until all have finished (a helper for offline use and tests)."""
    for req in reqs:
        scheduler.add_request(req)
    for _ in range(max_steps):
        if all(r.finished for r in reqs):
            return reqs
        scheduler.step()
    raise RuntimeError("requests did not finish within max_steps")


__all__ = ["Executor", "Scheduler", "run_to_completion"]
