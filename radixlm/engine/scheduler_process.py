"""The scheduler process: one per TP rank.  Rank 0 receives requests over ZMQ and broadcasts them to the other
ranks, every rank runs the same ``Scheduler.step()`` in lockstep, and rank 0 sends the new tokens back.

Under data-parallel attention the ranks of DP rank d (its attention group) run a scheduler of the requests the
front end tagged ``dp_rank == d`` (every rank sees every message and keeps its own); the schedulers of different
DP ranks agree on each step through ``DPLockstep``; the first rank of each attention group (its leader) sends its
requests' tokens and its stats on a socket of its own (the front end's socket fans them in); TP rank 0 answers the
control requests for all DP ranks.

Failure contract: an exception escaping the loop is logged with its traceback, a sending rank (rank 0; under DP
attention every DP rank's leader) sends a ``SchedulerFailure`` naming it (the front end answers every request in
flight with a 500; it notices another rank's exit by watching the processes), and the process exits with status 1.
With ``--watchdog-timeout`` a loop that makes no progress for that long while it has work (a hung forward) is ended
by the watchdog (``radixlm.utils.watchdog``): the stacks of every thread to the log, the same ``SchedulerFailure``,
exit status 3.  The front end never waits on a dead scheduler either way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import zmq

from radixlm.config import ServerArgs
from radixlm.core import Req
from radixlm.distributed import DPAttention, TPGroup, destroy_tensor_parallel
from radixlm.engine.io_struct import (
    AbortRequest,
    BatchTokenOutput,
    ControlReply,
    ControlRequest,
    GenerateRequest,
    SchedulerFailure,
    SchedulerInfo,
    TokenOutput,
)
from radixlm.executor import ModelRunner, ModelWorker
from radixlm.lora import LoRAAdapterError
from radixlm.models.loader import resolve_model_config
from radixlm.sampling.logprobs import RequestLogprobs
from radixlm.scheduler import Scheduler
from radixlm.scheduler.dp_lockstep import DPLockstep
from radixlm.utils import faults
from radixlm.utils.heap import HeapTrimmer
from radixlm.utils.watchdog import Watchdog

logger = logging.getLogger(__name__)

STATS_INTERVAL_S = 0.5  # how often each DP rank's leader sends SchedulerStats to the front end (metrics)


def run_scheduler_process(server_args: ServerArgs, tp_rank: int, in_addr: str | None, out_addr: str,
                          ready: Any) -> None:
    """Process entry point.  ``in_addr``: the front end's request socket, read by TP rank 0 only (None on the other
    nodes of a multi-node server); ``out_addr``: its output socket (``tcp://`` across nodes).  ``ready`` is a pipe
    end: it gets a ``SchedulerInfo`` or an error string."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    logging.basicConfig(level=server_args.log_level.upper(), format=f"[scheduler tp{tp_rank}] %(message)s")
    try:
        runner = ModelRunner(server_args, resolve_model_config(server_args), tp_rank=tp_rank)
        lockstep = DPLockstep.over(runner.dp) if runner.dp.enabled else None
        scheduler = Scheduler(server_args, ModelWorker(runner), lockstep)
    except Exception as e:  # report load errors to the parent instead of dying silently
        ready.send(f"{type(e).__name__}: {e}")
        raise
    ctx = zmq.Context()
    # zmq's default linger waits forever to deliver queued outputs at exit: an orphan (front end killed) would
    # never exit, the peer being gone.
    ctx.setsockopt(zmq.LINGER, 0)
    recv = send = None
    leader = runner.dp.attn_tp.rank == 0  # sends its DP rank's outputs (without DP attention: TP rank 0)
    if tp_rank == 0:
        recv = ctx.socket(zmq.PULL)
        recv.connect(in_addr)
    if leader:
        send = ctx.socket(zmq.PUSH)
        send.connect(out_addr)
    memory = runner.memory
    ready.send(SchedulerInfo(memory.max_total_num_tokens, memory.max_running_requests,
                             runner.model_config.context_length, runner.model_config.vocab_size))

    def report_failure(reason: str) -> None:
        """Tell the front end (DP leaders only) on a socket of its own: the watchdog calls this from its thread
        while the loop's socket may be in use."""
        if not leader:
            return
        # A context of its own: terminating it waits (up to the linger) until the message has left, which the
        # watchdog's os._exit right after would otherwise cut short.
        own = zmq.Context()
        sock = own.socket(zmq.PUSH)
        sock.connect(out_addr)
        sock.send_pyobj(SchedulerFailure(reason))
        sock.close(linger=2000)
        own.term()

    watchdog = None
    if server_args.watchdog_timeout:
        watchdog = Watchdog(server_args.watchdog_timeout, f"scheduler loop (tp rank {tp_rank})",
                            on_timeout=report_failure).start()
    try:
        clean = SchedulerLoop(scheduler, runner.dp, recv, send, watchdog).run()
    except Exception as e:
        logger.exception("the scheduler loop failed; failing every request in flight and exiting")
        if watchdog is not None:
            watchdog.stop()
        report_failure(f"internal error in the scheduler: {type(e).__name__}: {e}")
        sys.exit(1)
    if watchdog is not None:
        watchdog.stop()
    if clean:
        # Every rank leaves the loop at the same step (the stop message is broadcast), so they can part cleanly;
        # a rank that just exits leaves its peers' NCCL watchdogs polling a store that is gone.
        destroy_tensor_parallel()
    # The work is done: leave without the interpreter's shutdown.  A spawned process exits through sys.exit, whose
    # C++ static destructors can meet a torch.distributed thread that is still joinable and std::terminate the
    # process (exit -6: "terminate called without an active exception", seen on node 1 of a CPU multi-node run).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class SchedulerLoop:
    """One TP rank's loop.  ``dp``: its place under DP attention (``tp``: the whole TP group, which every message
    is broadcast to); ``recv``: TP rank 0's socket from the front end; ``send``: a DP leader's socket to it."""

    def __init__(self, scheduler: Scheduler, dp: DPAttention, recv: zmq.Socket | None,
                 send: zmq.Socket | None, watchdog: Watchdog | None = None):
        self.scheduler = scheduler
        self.watchdog = watchdog
        self.recv, self.send = recv, send
        self.dp = dp
        self.tp: TPGroup = dp.tp
        self.reqs: dict[str, Req] = {}
        self.sent: dict[str, int] = {}  # rid -> output tokens already sent
        self.parent_pid = os.getppid()
        self.log_interval = scheduler.args.decode_log_interval
        self._steps = 0
        self._next_stats = 0.0
        self._heap = HeapTrimmer()  # RSS tracks use over hours of varied batches
        self._stats_mark = self._log_mark = scheduler.load_mark()  # rates in stats and log lines start here

    def run(self) -> bool:
        """Serve until the front end says stop (returns True) or goes away (False: an orphan stops at once)."""
        while os.getppid() == self.parent_pid:
            if self.watchdog is not None:
                self.watchdog.beat()
            idle = self.scheduler.may_wait_for_requests()
            # An idle loop may wait for requests for good (rank 0 on its socket, the other ranks in the broadcast)
            with self.watchdog.idle() if idle and self.watchdog is not None else contextlib.nullcontext():
                messages = self._receive(block=idle)
            if messages is None:
                return True
            for msg in messages:
                self._handle(msg)
            if faults.ACTIVE is not None and self.reqs:
                faults.ACTIVE.fire("scheduler.step", self.reqs)
            if self.scheduler.step():
                self._steps += 1
                if self.log_interval > 0 and self._steps % self.log_interval == 0:
                    self._log_load()
            self._send_outputs()
            self._heap.maybe_trim()
        return False

    def _log_load(self) -> None:
        """One greppable key=value line of load every --decode-log-interval steps (each DP rank's leader);
        throughput and cache hit rate cover the time since the previous line."""
        if self.send is None:
            return
        st, self._log_mark = self.scheduler.stats(self._log_mark), self.scheduler.load_mark()
        logger.info("load: running=%d queued=%d grammar_queued=%d token_usage=%.3f cache_hit_rate=%.3f "
                    "gen_throughput=%.1f retracted=%d", st.num_running_reqs, st.num_queue_reqs,
                    st.num_grammar_queue_reqs, st.token_usage, st.cache_hit_rate, st.gen_throughput,
                    st.num_retracted_reqs_total)

    def _receive(self, block: bool) -> list[Any] | None:
        messages: list[Any] = []
        if self.recv is not None:
            if block:  # wake up now and then, so that the run loop can notice an orphaned scheduler
                self.recv.poll(1000)
            while True:
                try:
                    msg = self.recv.recv_pyobj(zmq.NOBLOCK)
                except zmq.Again:
                    break
                # A list is one submission of several requests (Engine._start): admitted in the same step.
                messages += msg if isinstance(msg, list) else [msg]
        messages = self.tp.broadcast_object(messages)
        return None if any(m is None for m in messages) else messages

    def _handle(self, msg: Any) -> None:
        if isinstance(msg, GenerateRequest):
            if msg.dp_rank != self.scheduler.dp_rank:
                return  # another DP rank's
            req = Req(rid=msg.rid, origin_input_ids=msg.input_ids, sampling_params=msg.sampling_params,
                      seed=msg.seed, return_hidden_states=msg.return_hidden_states, lora_name=msg.lora_name)
            if msg.logprob_options is not None:
                req.logprobs = RequestLogprobs(msg.logprob_options)
                req.logprobs.input_done = msg.logprob_options.input_start(len(msg.input_ids)) is None
            self.reqs[msg.rid] = req
            self.sent[msg.rid] = 0
            self.scheduler.add_request(req)
        elif isinstance(msg, AbortRequest):
            self.scheduler.abort_request(msg.rid)  # every DP rank: only the one holding it finds it
        elif isinstance(msg, ControlRequest):
            reply = self._control(msg)
            if self.tp.rank == 0:
                self.send.send_pyobj(reply)

    def _control(self, msg: ControlRequest) -> ControlReply:
        """Run on every rank in the same step (the message is broadcast); under DP attention the DP ranks
        exchange their answers and TP rank 0's reply covers them all."""
        if msg.kind == "flush_cache":
            # Every DP rank or none (all are idle, or none flushes), so that the one reply holds for every cache.
            ok = all(self._per_dp_rank(self.scheduler.is_idle())) and self.scheduler.tree_cache.flush()
            return ControlReply(msg.token, ok, {"message": "cache flushed" if ok else
                                                "requests are in flight; the cache was not flushed"})
        if msg.kind == "get_state":
            state = {**self.scheduler.state(), "num_tracked_reqs": len(self.reqs)}
            if not self.dp.enabled:
                return ControlReply(msg.token, True, state)
            per_rank = self._per_dp_rank(state)
            return ControlReply(msg.token, True, {**total_state(per_rank), "dp": per_rank})
        if msg.kind == "load_lora_adapter":
            return self._load_lora_adapter(msg)
        if msg.kind == "unload_lora_adapter":
            error = self._on_every_rank(lambda: self.scheduler.unload_lora_adapter(msg.args["name"]))
            return ControlReply(msg.token, error is None, {"message": error or "unloaded"})
        return ControlReply(msg.token, False, {"message": f"unknown control request {msg.kind!r}"})

    def _load_lora_adapter(self, msg: ControlRequest) -> ControlReply:
        """Load on every rank, or on none: a rank that loaded it unloads it again when another rank refused."""
        name, path = msg.args["name"], msg.args["path"]
        info: dict[str, Any] = {}
        error = self._on_every_rank(lambda: info.update(self.scheduler.worker.load_lora_adapter(name, path)))
        if error is not None and info:
            self.scheduler.worker.unload_lora_adapter(name)
        return ControlReply(msg.token, error is None, info if error is None else {"message": error})

    def _on_every_rank(self, action: Callable[[], Any]) -> str | None:
        """Run ``action`` here; the first rank's error message (a LoRAAdapterError's or a RuntimeError's: a
        refusal) or None when it succeeded on every TP rank.  Other exceptions are bugs and escape."""
        try:
            action()
            error = None
        except (LoRAAdapterError, RuntimeError) as e:
            error = str(e)
        errors = self.tp.all_gather_object(error)
        return next((e for e in errors if e is not None), None)

    def _per_dp_rank(self, value: Any) -> list[Any]:
        """Every DP rank's ``value`` in DP-rank order (its leader's); ``[value]`` without DP attention."""
        if not self.dp.enabled:
            return [value]
        return self.tp.all_gather_object(value)[:: self.dp.attn_tp.size]

    def _send_outputs(self) -> None:
        out = BatchTokenOutput()
        now = time.monotonic()
        if now >= self._next_stats:
            out.stats, self._stats_mark = self.scheduler.stats(self._stats_mark), self.scheduler.load_mark()
            self._next_stats = now + STATS_INTERVAL_S
        for rid, req in list(self.reqs.items()):
            sent = self.sent[rid]
            if len(req.output_ids) > sent or req.finished:
                first = sent == 0
                out.outputs.append(TokenOutput(rid, req.output_ids[sent:], req.finished_reason,
                                               len(req.origin_input_ids), len(req.output_ids), req.cached_tokens,
                                               req.logprobs.drain() if req.logprobs is not None else None,
                                               queue_time=req.queue_time if first else None,
                                               grammar_time=req.grammar_time if first else None,
                                               hidden_states=[h.tolist() for h in req.hidden_states[sent:]]
                                               if req.return_hidden_states else None))
                self.sent[rid] = len(req.output_ids)
            if req.finished:
                del self.reqs[rid], self.sent[rid]
        if (out.outputs or out.stats) and self.send is not None:
            self.send.send_pyobj(out)


def total_state(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """The engine's state from its DP ranks' (``Scheduler.state`` plus ``num_tracked_reqs``): counts and token
    numbers summed, ``token_usage`` of the summed pools."""
    total = {key: sum(state[key] for state in per_rank) for key in per_rank[0] if key != "token_usage"}
    free = total["available_kv_tokens"] + total["evictable_kv_tokens"]
    total["token_usage"] = round(1.0 - free / total["max_total_num_tokens"], 4)
    return total


__all__ = ["SchedulerLoop", "run_scheduler_process", "total_state"]
