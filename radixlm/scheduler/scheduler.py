"""The scheduler: continuous batching over a radix prefix cache.

Each ``step()`` runs one model step: a prefill (EXTEND) batch of newly admitted requests and the next chunk of a
long prompt when there are any, otherwise one DECODE step for every running request.  Memory never runs out:
admission reserves room for future decode tokens, and when decode still cannot grow, the requests with the
least progress are retracted to the waiting queue (their computed KV goes to the radix cache) and resumed later
with identical results (sampling randomness is keyed by request seed and output position).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from concurrent.futures import FIRST_COMPLETED, Future, wait

import torch

from radixlm.cache import RadixCache
from radixlm.config import ServerArgs
from radixlm.constrained import (
    GrammarBackend,
    GrammarSpec,
    accept_token,
    apply_grammar_masks,
    new_matcher,
    warm_up_grammar_masks,
)
from radixlm.core import ForwardBatch, Req
from radixlm.engine.io_struct import SchedulerStats
from radixlm.executor.batch_builder import build_decode_batch, build_extend_batch, to_device_async
from radixlm.executor.model_runner import ModelRunner
from radixlm.layers.logits_processor import LogitsOutput
from radixlm.sampling import SamplingBatchInfo
from radixlm.scheduler.policy import (
    PrefillBudget,
    cache_match_key,
    order_waiting_queue,
    reserved_decode_tokens,
)

logger = logging.getLogger(__name__)

# A waiting request whose uncached tokens start with this many tokens equal to those of a request already in
# the prefill batch is deferred by one step, so the shared part is computed once (SGLang's in-batch prefix
# caching); shorter overlaps are not worth a step of latency.
IN_BATCH_PREFIX_MIN = 32


class Scheduler:
    def __init__(self, server_args: ServerArgs, runner: ModelRunner):
        self.args = server_args
        self.runner = runner
        self.tree_cache = RadixCache(runner.req_to_token_pool, runner.token_to_kv_pool_allocator,
                                     server_args.page_size, disable=server_args.disable_radix_cache)
        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self.chunked_req: Req | None = None  # a prompt being prefilled chunk by chunk
        # Constrained requests wait here until their grammar is compiled (on the backend's worker threads).
        self.grammar_queue: list[tuple[Req, Future]] = []
        self._inflight: _InFlight | None = None  # a decode step launched but not yet read (overlap schedule)
        self.grammar_backend: GrammarBackend | None = None
        if server_args.grammar_backend == "xgrammar" and not server_args.skip_tokenizer_init:
            cfg = runner.model_config
            self.grammar_backend = GrammarBackend(server_args.tokenizer_path or cfg.model_path, cfg.vocab_size,
                                                  cfg.eos_token_ids)
            warm_up_grammar_masks(cfg.vocab_size, runner.device)
        self._running_info: SamplingBatchInfo | None = None  # rebuilt whenever `running` changes
        self._decode_turn = False  # alternate chunked prefill with decode so neither starves
        # Fraction of each request's remaining max_new_tokens reserved at admission; decays while decoding goes
        # well, jumps back after a retraction.
        self.init_new_token_ratio = min(0.7 * server_args.schedule_conservativeness, 1.0)
        self.min_new_token_ratio = self.init_new_token_ratio * 0.14
        self.new_token_ratio_decay = (self.init_new_token_ratio - self.min_new_token_ratio) / 600
        self.new_token_ratio = self.init_new_token_ratio
        self.num_retracted = 0
        # Lifetime totals; stats() turns them into rates since a LoadMark.
        self.num_generated_tokens = 0
        self.admitted_input_tokens = self.admitted_cached_tokens = 0

    # ------------------------------------------------------------------ requests in and out
    def add_request(self, req: Req) -> None:
        """Queue a request; one that can never fit finishes at once with an abort reason."""
        ctx = self.runner.model_config.context_length
        req.eos_token_ids = frozenset(self.runner.model_config.eos_token_ids)
        req.max_context_len = min(ctx, self.runner.max_total_num_tokens)
        req.created_time = req.created_time or time.time()
        if not req.origin_input_ids:
            req.finished_reason = {"type": "abort", "message": "the prompt is empty"}
        elif len(req.origin_input_ids) >= ctx:
            req.finished_reason = {"type": "abort", "message": f"the prompt has {len(req.origin_input_ids)} tokens; "
                                   f"the context length is {ctx}"}
        elif len(req.origin_input_ids) + 1 > self.runner.max_total_num_tokens:
            req.finished_reason = {"type": "abort", "message": "the prompt does not fit the KV cache "
                                   f"({self.runner.max_total_num_tokens} tokens)"}
        elif (spec := GrammarSpec.of(req.sampling_params)) is not None:
            if self.grammar_backend is None:
                req.finished_reason = {"type": "abort", "message": "structured output needs --grammar-backend "
                                       "xgrammar and a tokenizer"}
            else:
                self.grammar_queue.append((req, self.grammar_backend.compile(spec)))
        else:
            self.waiting.append(req)

    def abort_request(self, rid: str) -> Req | None:
        """Finish request ``rid`` wherever it is and return its memory; returns the request if found."""
        for req, future in self.grammar_queue:
            if req.rid == rid:
                self.grammar_queue.remove((req, future))
                req.finished_reason = {"type": "abort", "message": "aborted"}
                return req
        for req in self.waiting:
            if req.rid == rid:
                self.waiting.remove(req)
                req.finished_reason = {"type": "abort", "message": "aborted"}
                return req
        for req in self.running + ([self.chunked_req] if self.chunked_req else []):
            if req.rid == rid:
                req.finished_reason = {"type": "abort", "message": "aborted"}
                self._release([req])
                return req
        return None

    def is_idle(self) -> bool:
        return not (self.waiting or self.running or self.chunked_req or self.grammar_queue or self._inflight)

    def state(self) -> dict[str, int | float]:
        """Live load and memory numbers (``/get_server_info``).  ``available + cached == max_total`` when idle."""
        allocator = self.runner.token_to_kv_pool_allocator
        total = self.runner.max_total_num_tokens
        available, evictable = allocator.available_size(), self.tree_cache.evictable_size()
        return {
            "num_running_reqs": len(self.running) + (self.chunked_req is not None),
            "num_waiting_reqs": len(self.waiting),
            "num_grammar_queue_reqs": len(self.grammar_queue),
            "max_total_num_tokens": total,
            "available_kv_tokens": available,
            "cached_kv_tokens": self.tree_cache.total_size(),
            "evictable_kv_tokens": evictable,
            "protected_kv_tokens": self.tree_cache.protected_size(),
            "token_usage": round(1.0 - (available + evictable) / total, 4),
            "num_retracted_reqs": self.num_retracted,
        }

    def load_mark(self) -> LoadMark:
        return LoadMark(time.monotonic(), self.num_generated_tokens, self.admitted_input_tokens,
                        self.admitted_cached_tokens)

    def stats(self, since: LoadMark) -> SchedulerStats:
        """Load, memory and totals for metrics and the load log; throughput and cache hit rate since ``since``."""
        now = self.load_mark()
        state = self.state()
        admitted = now.admitted_input - since.admitted_input
        device = self.runner.device
        return SchedulerStats(
            num_running_reqs=state["num_running_reqs"], num_queue_reqs=state["num_waiting_reqs"],
            num_grammar_queue_reqs=state["num_grammar_queue_reqs"],
            num_used_tokens=state["max_total_num_tokens"] - state["available_kv_tokens"]
            - state["evictable_kv_tokens"],
            token_usage=state["token_usage"], max_total_num_tokens=state["max_total_num_tokens"],
            gen_throughput=(now.generated - since.generated) / max(now.time - since.time, 1e-6),
            cache_hit_rate=(now.admitted_cached - since.admitted_cached) / admitted if admitted else 0.0,
            gpu_memory_used_bytes=torch.cuda.memory_allocated(device) if device.type == "cuda" else 0,
            num_retracted_reqs_total=self.num_retracted,
            evicted_tokens_total=self.tree_cache.num_evicted_tokens,
        )

    # ------------------------------------------------------------------ the loop body
    def step(self) -> list[Req]:
        """Run one model step; returns the requests that got a token or finished in it."""
        failed = self._poll_grammar_queue()  # finished by a grammar that did not compile
        chain = not self.args.disable_overlap_schedule and self._can_chain()
        if self._inflight is not None:
            if not chain or self.chunked_req is not None or self._could_admit():
                return failed + self._finish_inflight()  # admission, retraction or a new batch need the real state
            return failed + self._decode(chain)
        if self.chunked_req is not None and self.running and self._decode_turn:
            self._decode_turn = False
            return failed + self._decode(chain)
        batch = self._admit()
        if batch:
            self._decode_turn = True
            return failed + self._extend(batch)
        return failed + (self._decode(chain) if self.running else [])

    # ------------------------------------------------------------------ prefill
    def _admit(self) -> list[Req]:
        """Choose the requests of the next EXTEND batch, lock their cached prefixes and give them rows."""
        if not self.waiting and self.chunked_req is None:
            return []
        budget = self._prefill_budget()
        if self.chunked_req is not None:
            req = self.chunked_req
            take = budget.plan(req.seq_len - req.kv_len, 0)
            if take is None:
                return []
            req.extend_len = take
            budget.take(req, take, 0)
        running = len(self.running) + len(budget.admitted)
        admitted_ids: list[list[int]] = []  # tokens of this batch's requests, for in-batch prefix sharing
        for req in order_waiting_queue(self.waiting, self.args.schedule_policy, self.tree_cache):
            if (self.chunked_req is not None or not budget.can_take()
                    or running >= self.runner.max_running_requests
                    or self.runner.req_to_token_pool.available_size() == 0):
                break
            match = self.tree_cache.match_prefix(cache_match_key(req))
            prefix_len = len(match.device_indices)
            if not self.tree_cache.disable and self._shares_uncached_prefix(req, prefix_len, admitted_ids):
                continue  # wait one step: the batch caches the shared part, then this request reuses it
            reserve = reserved_decode_tokens(req, self.new_token_ratio)
            # Locking the matched prefix makes its evictable tokens protected: the budget counted them as memory
            # that eviction could free, so it shrinks by as much (a retracted request re-matches all its KV).
            locked = self.tree_cache.inc_lock_ref(match.last_node)
            budget.rem_total_tokens -= locked
            take = budget.plan(req.seq_len - prefix_len, reserve)
            if take is None:
                self.tree_cache.dec_lock_ref(match.last_node)
                budget.rem_total_tokens += locked
                break
            req.prefix_indices, req.last_node = match.device_indices, match.last_node
            if req.num_retractions == 0:
                req.cached_tokens = prefix_len
                req.queue_time = time.time() - req.created_time
                self.admitted_input_tokens += len(req.origin_input_ids)
                self.admitted_cached_tokens += prefix_len
            req.req_pool_idx = self.runner.req_to_token_pool.alloc(1)[0]
            self.runner.req_to_token_pool.write(req.req_pool_idx, 0, match.device_indices)
            req.kv_len, req.extend_len = prefix_len, take
            budget.take(req, take, reserve)
            admitted_ids.append(req.all_ids())
            running += 1
            if take < req.seq_len - prefix_len:
                self.chunked_req = req
        admitted = set(map(id, budget.admitted))
        self.waiting = [r for r in self.waiting if id(r) not in admitted]
        return budget.admitted

    def _prefill_budget(self) -> PrefillBudget:
        """What a prefill batch may take now: free + evictable KV minus the running requests' decode reserve."""
        reserve = sum(reserved_decode_tokens(r, self.new_token_ratio) for r in self.running)
        chunk = self.args.chunked_prefill_size if self.args.chunked_prefill_size > 0 else None
        return PrefillBudget(self.runner.token_to_kv_pool_allocator.available_size()
                             + self.tree_cache.evictable_size() - reserve, self.args.max_prefill_tokens, chunk)

    def _could_admit(self) -> bool:
        """Whether ``_admit`` would take the first waiting request (in policy order) now, planned the same way
        without locking anything.  While it would not (the KV pool is full), the overlap schedule keeps chaining
        decode steps instead of reading each one back for an admission that fails."""
        if not self.waiting or len(self.running) >= self.runner.max_running_requests:
            return False
        if self.runner.req_to_token_pool.available_size() == 0:
            return False
        budget = self._prefill_budget()
        if not budget.can_take():
            return False
        req = order_waiting_queue(self.waiting, self.args.schedule_policy, self.tree_cache)[0]
        prefix_len = len(self.tree_cache.match_prefix(cache_match_key(req)).device_indices)
        return budget.plan(req.seq_len - prefix_len, reserved_decode_tokens(req, self.new_token_ratio)) is not None

    def _extend(self, reqs: list[Req]) -> list[Req]:
        self._ensure_free(sum(r.extend_len for r in reqs))
        info = self._sampling_info(reqs)
        starts = [self._logits_start(r) for r in reqs]
        fb = build_extend_batch(self.runner, [r.req_pool_idx for r in reqs], [r.kv_len for r in reqs],
                                [r.all_ids()[r.kv_len : r.kv_len + r.extend_len] for r in reqs],
                                logits_start=[r.extend_len - 1 if st is None else st for r, st in zip(reqs, starts)]
                                if any(st is not None for st in starts) else None,
                                sampling_info=info)
        logits = self.runner.forward(fb)
        apply_grammar_masks(reqs, logits.next_token_logits)
        next_ids = self.runner.sample(logits, fb)
        if fb.extend_logits_start_cpu is not None:
            self._record_input_logprobs(reqs, starts, logits.input_token_logits)
        samples = [r.kv_len + r.extend_len >= r.seq_len and r.sampling_params.max_new_tokens != 0 for r in reqs]
        self._record_output_logprobs(reqs, samples, logits.next_token_logits, info, next_ids)
        updated = []
        for req, tok in zip(reqs, next_ids.tolist()):
            req.kv_len += req.extend_len
            # Into the tree right away, so requests sharing this prompt can reuse it while this one decodes.
            self.tree_cache.cache_unfinished_req(req)
            if req.kv_len < req.seq_len:  # more chunks to come: the sampled token is meaningless
                continue
            if req is self.chunked_req:
                self.chunked_req = None
            updated.append(req)
            if req.sampling_params.max_new_tokens == 0:  # prefill only (e.g. to cache a prompt shared by n > 1)
                req.finished_reason = {"type": "length", "length": 0}
                continue
            req.output_ids.append(tok)
            self.num_generated_tokens += 1
            accept_token(req, tok)
            req.check_finished()
            if not req.finished:
                self.running.append(req)
        self._running_info = None
        self._release([r for r in updated if r.finished])
        return updated

    # ------------------------------------------------------------------ decode
    def _decode(self, chain: bool) -> list[Req]:
        """One decode step for every running request, in three moves: enqueue the forward, read the previous
        step's tokens, enqueue the sampling.  With ``chain`` (the overlap schedule, ``_can_chain``) the previous
        step is still in flight when this one is launched: its tokens, still on the device, are this step's
        input ids, and the host reads them (and finishes requests, advances grammars) while the GPU runs this
        step's forward.  A grammar's mask for this step is built after that read, so it reflects the previous
        token.  Without ``chain`` the step's own tokens are read at once."""
        prev, self._inflight = self._inflight, None
        launched = self._launch_forward(prev)
        updated = self._resolve(prev) if prev is not None else []
        if launched is None:
            return updated
        flight = self._launch_sample(launched)
        if not chain:
            return updated + self._resolve(flight)
        if not all(r.finished for r in flight.reqs):
            # (When all have finished nothing will read the step: the GPU writes its KV into freed slots before
            # any later batch can reuse them, one stream, in order.)
            self._inflight = flight
        return updated

    def _can_chain(self) -> bool:
        """Whether the next decode batch may be launched before the last one's tokens are known on the host: the
        requests of the step in flight or some of them (others finished), none needing logprobs (read with its
        step), and room for one more token each without eviction or retraction."""
        reqs = self.running
        if not reqs or any(r.logprobs is not None for r in reqs):
            return False
        if self._inflight is None:
            return True  # a fresh launch, which makes its own room
        if self._inflight.reqs is not reqs:
            launched = set(map(id, self._inflight.reqs))
            if not all(id(r) in launched for r in reqs):
                return False
        return self.runner.token_to_kv_pool_allocator.available_size() >= self._decode_slots_needed()

    def _launch_forward(self, prev: "_InFlight | None") -> "_Launched | None":
        """Enqueue the forward of one decode step (None when retraction left nothing to run).  Each request's input
        token is its last output id, or with ``prev`` the id ``prev`` sampled for it (not yet on the host);
        ``kv_len`` counts the KV this step writes from now on."""
        if prev is None:
            self._make_room_for_decode()
            if not self.running:
                return None
        reqs = self.running
        if prev is None:
            last = [r.output_ids[-1] for r in reqs]
        elif prev.reqs is reqs:
            last = prev.next_ids
        else:  # requests finished since prev was launched: the rows of those still running
            row = {id(r): i for i, r in enumerate(prev.reqs)}
            last = prev.next_ids[to_device_async([row[id(r)] for r in reqs], self.runner.device)]
        if self._running_info is None:
            self._running_info = self._sampling_info(reqs)
            if prev is not None:
                self._running_info.update(last)  # prev's tokens are not in output_ids yet
        fb = build_decode_batch(self.runner, [r.req_pool_idx for r in reqs], [r.kv_len for r in reqs], last,
                                sampling_info=self._running_info)
        for req in reqs:
            req.kv_len += 1
        return _Launched(reqs, fb, self.runner.forward(fb))

    def _launch_sample(self, step: "_Launched") -> "_InFlight":
        """Enqueue grammar masks, sampling and the copy of the new tokens to the host."""
        logits = step.logits.next_token_logits
        apply_grammar_masks(step.reqs, logits)
        next_ids = self.runner.sample(step.logits, step.batch)
        info = step.batch.sampling_info
        self._record_output_logprobs(step.reqs, [True] * len(step.reqs), logits, info, next_ids)
        info.update(next_ids)
        host_ids, ready = self.runner.copy_to_host(next_ids)
        return _InFlight(step.reqs, next_ids, host_ids, ready)

    def _resolve(self, flight: "_InFlight") -> list[Req]:
        """Read a launched step's tokens (waiting for that step only) and finish what they finish.  A request
        that finished or was aborted after the step was launched drops its token; its KV is already accounted."""
        for req, tok in zip(flight.reqs, flight.tokens()):
            if req.finished:
                continue
            req.output_ids.append(tok)
            self.num_generated_tokens += 1
            accept_token(req, tok)
            req.check_finished()
        self.new_token_ratio = max(self.new_token_ratio - self.new_token_ratio_decay, self.min_new_token_ratio)
        finished = [r for r in flight.reqs if r.finished and r.req_pool_idx is not None]
        if finished:
            self._release(finished)
        return list(flight.reqs)

    def _finish_inflight(self) -> list[Req]:
        flight, self._inflight = self._inflight, None
        return self._resolve(flight) if flight is not None else []

    def _poll_grammar_queue(self) -> list[Req]:
        """Move requests whose grammar is compiled to the waiting queue; returns those whose compilation failed
        (finished with an abort).  Waits briefly when nothing else could run, instead of spinning.

        With several TP ranks every rank must admit the same requests in the same step, so there the compilation
        is awaited: the ranks' worker threads finish at different times."""
        if not self.grammar_queue:
            return []
        futures = [f for _, f in self.grammar_queue]
        if self.runner.tp.size > 1:
            wait(futures)
        elif not (self.waiting or self.running or self.chunked_req):
            wait(futures, timeout=0.05, return_when=FIRST_COMPLETED)
        failed, pending = [], []
        for req, future in self.grammar_queue:
            if not future.done():
                pending.append((req, future))
            elif future.exception() is not None:
                req.finished_reason = {"type": "abort", "message": str(future.exception())}
                failed.append(req)
            else:
                req.grammar = new_matcher(future.result())
                req.grammar_time = time.time() - req.created_time
                self.waiting.append(req)
        self.grammar_queue = pending
        return failed

    def _make_room_for_decode(self) -> None:
        """Every running request needs one KV slot: evict cached prefixes, then retract requests if needed."""
        allocator = self.runner.token_to_kv_pool_allocator
        while self.running and allocator.available_size() < self._decode_slots_needed():
            self.tree_cache.evict(self._decode_slots_needed() - allocator.available_size())
            if allocator.available_size() >= self._decode_slots_needed():
                break
            self._retract_one()

    def _decode_slots_needed(self) -> int:
        """KV slots the next decode step allocates: a fresh page for each request whose last page is full."""
        page = self.runner.token_to_kv_pool_allocator.page_size
        return sum(1 for r in self.running if r.kv_len % page == 0) * page

    def _retract_one(self) -> None:
        """Send the request with the least progress back to the waiting queue (its KV goes to the cache)."""
        victim = min(self.running, key=lambda r: (len(r.output_ids), -len(r.origin_input_ids)))
        self.running.remove(victim)
        self._running_info = None
        self.tree_cache.cache_finished_req(victim)
        victim.reset_for_retraction()
        self.waiting.insert(0, victim)
        self.num_retracted += 1
        self.new_token_ratio = 1.0
        logger.info("retracted request %s (%d tokens out); KV pool full", victim.rid, len(victim.output_ids))

    @staticmethod
    def _shares_uncached_prefix(req: Req, prefix_len: int, admitted_ids: list[list[int]]) -> bool:
        """True when a request of the batch being built starts with the same IN_BATCH_PREFIX_MIN tokens beyond
        this request's cached prefix: admitting both would compute that shared part twice."""
        ids = req.all_ids()
        end = prefix_len + IN_BATCH_PREFIX_MIN
        return len(ids) > end and any(other[:end] == ids[:end] for other in admitted_ids)

    # ------------------------------------------------------------------ logprobs
    @staticmethod
    def _logits_start(req: Req) -> int | None:
        """Index within this extend from which every token's logits are needed (prompt logprobs), or None."""
        lp = req.logprobs
        if lp is None or lp.input_done:
            return None
        first_row = max(lp.options.input_start(len(req.origin_input_ids)), 1) - 1  # row q scores token q + 1
        return max(0, min(first_row - req.kv_len, req.extend_len - 1))

    @staticmethod
    def _record_input_logprobs(reqs: list[Req], starts: list[int | None], rows: torch.Tensor) -> None:
        offset = 0
        for req, start in zip(reqs, starts):
            n = req.extend_len - (req.extend_len - 1 if start is None else start)
            if start is not None:
                lp, prompt = req.logprobs, req.origin_input_ids
                first = lp.options.input_start(len(prompt))
                if first == 0 and req.kv_len == 0:
                    lp.record_input_first(prompt[0])
                positions = range(req.kv_len + start, req.kv_len + req.extend_len)  # rows' own positions
                keep = [j for j, q in enumerate(positions) if max(first, 1) <= q + 1 < len(prompt)]
                if keep:
                    chosen = rows[offset + keep[0] : offset + keep[-1] + 1].log_softmax(dim=-1)
                    lp.record(chosen, [prompt[positions[j] + 1] for j in keep], output=False)
                if req.kv_len + req.extend_len >= len(prompt):
                    lp.input_done = True
            offset += n

    def _record_output_logprobs(self, reqs: list[Req], samples: list[bool], logits: torch.Tensor,
                                info: SamplingBatchInfo, next_ids: torch.Tensor) -> None:
        """Logprob of each request's new output token (``samples[i]``: request i produced one this step)."""
        rows = [i for i, (r, real) in enumerate(zip(reqs, samples)) if real and r.logprobs is not None]
        if not rows:
            return
        logprobs = self.runner.sampler.logprobs(logits, info)  # [bs, vocab]
        for i in rows:
            reqs[i].logprobs.record(logprobs[i : i + 1], [int(next_ids[i])], output=True)

    # ------------------------------------------------------------------ helpers
    def _ensure_free(self, num_tokens: int) -> None:
        allocator = self.runner.token_to_kv_pool_allocator
        short = num_tokens + allocator.page_size * 2 - allocator.available_size()
        if short > 0:
            self.tree_cache.evict(short)

    def _release(self, reqs: list[Req]) -> None:
        """Hand finished or aborted requests' KV to the cache and drop them from the batch."""
        for req in reqs:
            if req.req_pool_idx is not None:
                self.tree_cache.cache_finished_req(req)
            if req is self.chunked_req:
                self.chunked_req = None
        gone = set(map(id, reqs))
        if any(id(r) in gone for r in self.running):
            self.running = [r for r in self.running if id(r) not in gone]
            self._running_info = None

    def _sampling_info(self, reqs: list[Req]) -> SamplingBatchInfo:
        return SamplingBatchInfo.from_requests(
            [r.sampling_params for r in reqs], [r.seed for r in reqs], [r.origin_input_ids for r in reqs],
            [r.output_ids for r in reqs], self.runner.model_config.eos_token_ids,
            self.runner.model_config.vocab_size, self.runner.device,
        )


@dataclass(frozen=True)
class LoadMark:
    """The scheduler's totals at one moment, from which ``stats`` computes rates."""

    time: float  # time.monotonic()
    generated: int
    admitted_input: int
    admitted_cached: int


@dataclass
class _Launched:
    """A decode step whose forward is enqueued and whose sampling is not."""

    reqs: list[Req]  # the batch, in row order
    batch: ForwardBatch
    logits: LogitsOutput


@dataclass
class _InFlight:
    """A decode step whose tokens are sampled on the device and on their way to the host."""

    reqs: list[Req]  # the batch, in row order
    next_ids: torch.Tensor  # [bs] int64 on the model's device: the next step's input ids
    host_ids: torch.Tensor  # [bs] int64 on the host (pinned on CUDA), valid once ``ready`` has fired
    ready: "torch.cuda.Event | None"  # recorded after the copy; None when the copy was synchronous (CPU)

    def tokens(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()  # this step's sampling and copy, not the work enqueued after it
        return self.host_ids.tolist()


def run_to_completion(scheduler: Scheduler, reqs: list[Req], max_steps: int = 1_000_000) -> list[Req]:
    """Add ``reqs`` and step until all have finished (a helper for offline use and tests)."""
    for req in reqs:
        scheduler.add_request(req)
    for _ in range(max_steps):
        if all(r.finished for r in reqs):
            return reqs
        scheduler.step()
    raise RuntimeError("requests did not finish within max_steps")


__all__ = ["Scheduler", "run_to_completion"]
