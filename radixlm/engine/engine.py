"""The offline ``Engine``: tokenizer and detokenizer in this process, the scheduler (one process per TP rank)
behind ZMQ.  SGLang-compatible shape::

    with radixlm.Engine() as engine:              # the embedded model
        out = engine.generate("The capital of France is", {"max_new_tokens": 16, "temperature": 0})
        out["text"], out["output_ids"], out["meta_info"]["finish_reason"]

LoRA (``enable_lora=True``, ``lora_paths=["name=path"]``): ``generate(..., lora_path="name")`` (or one entry per
prompt), ``load_lora_adapter(name, path)``, ``unload_lora_adapter(name)``; see ``radixlm.engine.lora_registry``.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import random
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import zmq

from radixlm.config import ServerArgs
from radixlm.distributed import free_local_addr
from radixlm.engine.detokenizer import RequestDecoder
from radixlm.engine.dispatcher import Dispatcher
from radixlm.engine.lora_registry import LoRARegistry
from radixlm.engine.io_struct import (
    AbortRequest,
    ControlReply,
    ControlRequest,
    GenerateRequest,
    SchedulerFailure,
    SchedulerInfo,
    TokenOutput,
)
from radixlm.engine.node import STOP_TIMEOUT_S, LocalSchedulers, bind_front_end
from radixlm.engine.request_state import (
    EngineDeadError,
    EngineUnavailableError,
    RequestFailedError,
    RequestState,
    raise_if_rejected,
)
from radixlm.engine.request_validator import RequestValidator, check_streamable
from radixlm.errors import InvalidRequestError
from radixlm.metrics import MetricsCollector
from radixlm.models.embedded import embedded_model_path
from radixlm.sampling import SamplingParams
from radixlm.sampling.logprobs import LogprobOptions
from radixlm.utils import faults

PROGRESS_BAR_MIN_PROMPTS = 64
RETRY_AFTER_S = 1  # what a 503 for a full queue or a draining server tells the client to wait
EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"

logger = logging.getLogger(__name__)


class Engine:
    """The front end of the engine: tokenizes, sends requests to the scheduler, detokenizes what comes back.

    Thread-safe; usable from plain threads (``generate``) and from asyncio (``async_generate``, and the
    ``submit``/``stream_state`` pair the HTTP server uses).  Detokenization runs on a receiver thread, never
    on the caller's event loop.
    """

    def __init__(self, model_path: str | None = None, **server_args: Any):
        from transformers import AutoTokenizer

        self.server_args = ServerArgs(model_path=model_path, **server_args)
        if self.server_args.dp_replicas:
            dp = self.server_args.dp_size
            raise ValueError(f"Engine(dp_size={dp}) without enable_dp_attention: data-parallel replicas are whole "
                             f"servers behind a router; run `radixlm serve --dp-size {dp}` (or set "
                             "enable_dp_attention=True for an MLA model's data-parallel attention)")
        if self.server_args.node_rank != 0:
            raise ValueError(f"--node-rank {self.server_args.node_rank}: the front end runs on node 0; the other "
                             "nodes run radixlm.engine.node.run_node (`radixlm serve --node-rank k`)")
        if self.server_args.tp_size > 1 and self.server_args.dist_init_addr is None:
            self.server_args = self.server_args.replace(dist_init_addr=free_local_addr())
        self.model_path = self.server_args.model_path or embedded_model_path()
        self.lora = LoRARegistry(self.server_args.enable_lora, self.server_args.lora_path_map())
        self.tokenizer = (None if self.server_args.skip_tokenizer_init
                          else AutoTokenizer.from_pretrained(self.server_args.tokenizer_path or self.model_path))
        self._rng = random.Random(self.server_args.random_seed)
        self._states: dict[str, RequestState] = {}
        self._replies: dict[str, tuple[asyncio.AbstractEventLoop | None, Any]] = {}  # token -> (loop, future)
        self._lock = threading.RLock()  # reentrant: _start admits and registers requests under one hold
        self._send_lock = threading.Lock()  # ZMQ sockets are not thread-safe; the receiver thread sends too
        self._closed = False
        self.dead_reason: str | None = None  # set once a scheduler process died
        # Requests submitted that have no output token yet (--max-queued-requests); rids, n copies counted apart
        self._queued: set[str] = set()
        self._refusing: str | None = None  # set by stop_admitting: why new requests get 503
        # The name the API reports and metrics carry: SGLang's default is the model path as given.
        self.model_name = self.server_args.served_model_name or self.server_args.model_path or EMBEDDED_MODEL_NAME
        self.metrics = (MetricsCollector(self.model_name, self.server_args.dp_size) if self.server_args.enable_metrics
                        else None)
        # Data-parallel attention: each request goes to one DP rank's scheduler (the others ignore it)
        self._dispatcher = (Dispatcher(self.server_args.dp_size, self.server_args.load_balance_method)
                            if self.server_args.enable_dp_attention else None)

        self._ipc_dir = tempfile.TemporaryDirectory(prefix="radixlm-")  # mkdtemp: only this user may enter
        sockets = bind_front_end(self.server_args, self._ipc_dir.name)
        self._zmq, self._to_scheduler, self._from_scheduler = sockets.context, sockets.requests, sockets.outputs

        # Only this node's TP ranks; the other nodes' join the same torch.distributed group, so the ranks here
        # report ready only once every node's are up (radixlm.engine.node).
        self._schedulers = LocalSchedulers(self.server_args, sockets.in_addr, sockets.out_addr)
        atexit.register(self.shutdown)
        try:
            infos = self._schedulers.wait_ready()
        except BaseException:
            self.shutdown()
            raise
        self.info: SchedulerInfo = SchedulerInfo.smallest(infos)
        self.validator = RequestValidator(self.tokenizer, self.info, self.server_args.grammar_backend)
        self._receiver = threading.Thread(target=self._receive_loop, daemon=True, name="radixlm-receiver")
        self._receiver.start()

    # ------------------------------------------------------------------ public API
    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool = False,
        logprob_start_len: int | None = None,
        top_logprobs_num: int | None = None,
        token_ids_logprob: list[int] | None = None,
        stream: bool = False,
        return_hidden_states: bool = False,
        lora_path: str | list[str | None] | None = None,
    ) -> dict[str, Any] | list[dict[str, Any]] | Iterator[dict[str, Any]]:
        """Generate for one prompt (returns a dict) or a batch (returns a list, in order).

        ``sampling_params`` uses SGLang's keys (``max_new_tokens``, ``temperature``, ``stop``, ...), one dict
        shared by the batch or one per prompt; ``n > 1`` returns n results per prompt (a list), the prompt
        prefilled once and shared through the radix cache.  With ``stream=True`` (single prompt, n = 1) an
        iterator of ``{"text": delta, "output_ids": new ids, "meta_info": ...}`` chunks is returned.

        ``return_logprob`` adds SGLang's ``output_token_logprobs`` ([logprob, token_id, None] per output token)
        and, from ``logprob_start_len`` on, ``input_token_logprobs``; ``top_logprobs_num`` adds
        ``*_top_logprobs``, ``token_ids_logprob`` adds ``*_token_ids_logprobs`` to ``meta_info``.
        ``return_hidden_states`` adds ``hidden_states``: the model's final hidden state (after the last norm) at
        the position that produced each output token, one list of ``hidden_size`` floats per token.
        ``lora_path``: the served LoRA adapter to run under (its name), or one per prompt (None: the base model);
        an adapter that is not served (or being unloaded) raises InvalidRequestError naming it.
        """
        ids, params, single = self.prepare(prompt, sampling_params, input_ids)
        options = LogprobOptions.from_request(return_logprob, logprob_start_len, top_logprobs_num, token_ids_logprob)
        if stream:
            check_streamable(params)
        states = self._start(ids, params, options, loop=None, return_hidden_states=return_hidden_states,
                             lora_path=lora_path)
        if stream:
            return self._stream(states[0])
        self._wait(states)
        results = [s.result() for s in states]
        return results[0] if single and len(states) == 1 else results

    async def async_generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool = False,
        logprob_start_len: int | None = None,
        top_logprobs_num: int | None = None,
        token_ids_logprob: list[int] | None = None,
        stream: bool = False,
        return_hidden_states: bool = False,
        lora_path: str | list[str | None] | None = None,
    ) -> dict[str, Any] | list[dict[str, Any]] | AsyncIterator[dict[str, Any]]:
        """Like ``generate``; with ``stream=True`` returns an async iterator of chunks."""
        ids, params, single = await asyncio.to_thread(self.prepare, prompt, sampling_params, input_ids)
        options = LogprobOptions.from_request(return_logprob, logprob_start_len, top_logprobs_num, token_ids_logprob)
        if stream:
            check_streamable(params)
        states = await self.submit(ids, params, options, return_hidden_states=return_hidden_states,
                                   lora_path=lora_path)
        if stream:
            return self.stream_state(states[0])
        results = [await self.wait_state(s) for s in states]
        return results[0] if single and len(states) == 1 else results

    def abort(self, rid: str) -> None:
        """Stop request ``rid`` (``meta_info["id"]``); it finishes with ``{"type": "abort"}``."""
        self._send(AbortRequest(rid))

    def scheduler_pids(self) -> list[int]:
        """This node's scheduler processes (all of them on a single node)."""
        return [p.pid for p in self._schedulers.procs]

    def num_tracked_requests(self) -> int:
        """Requests this front end still waits on (0 when idle: a finished or failed request is forgotten)."""
        with self._lock:
            return len(self._states)

    def abort_all(self) -> None:
        """Stop every request in flight."""
        with self._lock:
            rids = list(self._states)
        for rid in rids:
            self.abort(rid)

    def flush_cache(self) -> bool:
        """Empty the radix cache; False (and nothing changes) while requests are in flight."""
        return self.control("flush_cache").ok

    def load_lora_adapter(self, name: str, path: str, timeout: float = 120.0) -> dict[str, Any]:
        """Load the PEFT adapter at ``path`` on every rank and serve it as ``name``; returns {"name", "rank",
        "target_modules"}.  LoRAAdapterError with the adapter's problem (bad files or shapes, rank above
        --max-lora-rank, outside --lora-allowed-dir, a name already served, LoRA not enabled): nothing changes."""
        return self.lora.load(name, path, lambda kind, args: self.control(kind, timeout, args))

    def unload_lora_adapter(self, name: str, timeout: float | None = None) -> None:
        """Stop serving adapter ``name``: new requests naming it fail at once (InvalidRequestError), this call
        WAITS until its requests in flight have finished normally (up to ``timeout`` s, None: no limit; on
        TimeoutError it serves again), then frees it on every rank, its cached KV included.  LoRAAdapterError
        for a name that is not served or a server without LoRA."""
        with self._lock:  # no request can pass the adapter check between here and its registration
            self.lora.begin_unload(name)

        def in_flight(adapter: str) -> int:
            with self._lock:
                return sum(s.lora_name == adapter for s in self._states.values())

        self.lora.finish_unload(name, in_flight, lambda kind, args: self.control(kind, args=args), timeout)

    def control(self, kind: str, timeout: float = 30.0, args: dict[str, Any] | None = None) -> ControlReply:
        """Ask the scheduler (see ``ControlRequest``) and wait for its reply."""
        done = threading.Event()
        box: list[ControlReply] = []
        token = self._register_reply(None, lambda reply: (box.append(reply), done.set()))
        self._send(ControlRequest(token, kind, args or {}))
        if not done.wait(timeout):
            raise TimeoutError(f"the scheduler did not answer {kind!r} within {timeout} s")
        return self._checked(box[0])

    async def async_control(self, kind: str, timeout: float = 30.0) -> ControlReply:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ControlReply] = loop.create_future()
        token = self._register_reply(loop, lambda reply: future.done() or future.set_result(reply))
        self._send(ControlRequest(token, kind))
        return self._checked(await asyncio.wait_for(future, timeout))

    def _checked(self, reply: ControlReply) -> ControlReply:
        if not reply.ok and self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        return reply

    # ------------------------------------------------------------------ the asyncio front end (HTTP server)
    def check_ready(self) -> None:
        """Raise ``EngineDeadError`` if requests can no longer be served."""
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        if self._closed:
            raise EngineDeadError("the engine is shut down")

    def check_admitting(self) -> None:
        """Raise ``EngineUnavailableError`` (HTTP 503) if a new request would be refused now: the engine is dead or
        shut down, or it drains (``stop_admitting``)."""
        self.check_ready()
        if self._refusing is not None:
            raise EngineUnavailableError(self._refusing, retry_after=RETRY_AFTER_S)

    def stop_admitting(self, reason: str) -> None:
        """From now on new requests raise ``EngineUnavailableError(reason)``; those in flight go on (a drain)."""
        self._refusing = reason

    @property
    def num_in_flight(self) -> int:
        """Requests submitted and not finished (n copies counted apart)."""
        return len(self._states)

    def _admit(self, count: int) -> None:
        """Admission of ``count`` new sequences: 503 while draining or when the queue (submitted, no output token
        yet) would pass ``--max-queued-requests``; call under ``_lock``, then register them before releasing it."""
        self.check_admitting()
        limit = self.server_args.max_queued_requests
        if limit is None:
            return
        if count > limit:
            raise InvalidRequestError(f"this request asks for {count} sequences (prompts x n); the server queues at "
                                      f"most {limit} (--max-queued-requests)", "n")
        if len(self._queued) + count > limit:
            raise EngineUnavailableError(f"the server is overloaded: {len(self._queued)} requests are queued "
                                         f"(--max-queued-requests {limit}); retry later", retry_after=RETRY_AFTER_S)

    async def submit(self, ids: list[list[int]], params: list[SamplingParams], options: LogprobOptions | None,
                     rids: list[str | None] | None = None, return_hidden_states: bool = False,
                     lora_path: str | list[str | None] | None = None) -> list[RequestState]:
        """Start prepared requests whose chunks go to the running event loop: ``len(ids) * n`` states.  Started
        on a worker thread: a batch of thousands takes a while to register, and the event loop serves everyone.
        ``lora_path``: as in ``generate``."""
        return await asyncio.to_thread(self._start, ids, params, options, asyncio.get_running_loop(), rids,
                                       return_hidden_states, lora_path)

    async def stream_state(self, state: RequestState) -> AsyncIterator[dict[str, Any]]:
        """The chunks of one request (deltas), the last with ``finish_reason`` set.  Closing the iterator before
        the end aborts the request, so a client that goes away frees its KV cache."""
        try:
            while True:
                chunk = await state.next_chunk()
                yield chunk
                if chunk["meta_info"]["finish_reason"] is not None:
                    return
        finally:
            if not state.finished and self.dead_reason is None and not self._closed:
                self.abort(state.rid)

    async def wait_state(self, state: RequestState) -> dict[str, Any]:
        """The whole result of one request; cancelling the waiting task aborts the request."""
        async for _ in self.stream_state(state):
            pass
        return state.result()

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._fail_pending("the engine is shut down")
        try:
            with self._send_lock:
                self._to_scheduler.send_pyobj(None, zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        if getattr(self, "_schedulers", None) is not None:
            self._schedulers.join(STOP_TIMEOUT_S)
        self._zmq.destroy(linger=0)
        self._ipc_dir.cleanup()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ internals
    def _send(self, msg: Any) -> None:
        self.check_ready()
        with self._send_lock:
            self._to_scheduler.send_pyobj(msg)

    def require_tokenizer(self) -> Any:
        """The tokenizer; InvalidRequestError (a 400 for HTTP callers) when the engine runs without one."""
        return self.validator.require_tokenizer()

    def prepare(self, prompt, sampling_params, input_ids, defaults: dict[str, Any] | None = None
                ) -> tuple[list[list[int]], list[SamplingParams], bool]:
        """Tokenize and validate a request (``RequestValidator.prepare``): (token ids per prompt, parsed params per
        prompt, whether a single prompt was given).  Slow for huge prompts, so asyncio callers run it in a thread."""
        return self.validator.prepare(prompt, sampling_params, input_ids, defaults)

    def check_prompt_chars(self, chars: int, param: str) -> None:
        """InvalidRequestError when a text of ``chars`` characters cannot fit the context (before tokenizing)."""
        self.validator.check_prompt_chars(chars, param)

    def _start(self, ids: list[list[int]], params: list[SamplingParams], options: LogprobOptions | None,
               loop: asyncio.AbstractEventLoop | None, rids: list[str | None] | None = None,
               return_hidden_states: bool = False,
               lora_path: str | list[str | None] | None = None) -> list[RequestState]:
        if options and options.token_ids_logprob:
            bad = [t for t in options.token_ids_logprob if not 0 <= t < self.info.vocab_size]
            if bad:
                raise InvalidRequestError(f"token_ids_logprob has ids outside the vocabulary "
                                          f"[0, {self.info.vocab_size}): {bad}", "token_ids_logprob")
        self.check_ready()
        wanted = [r for r in rids or [] if r is not None]
        with self._lock:
            taken = [r for r in wanted if r in self._states]
        if taken or len(set(wanted)) != len(wanted):
            raise InvalidRequestError(f"rid {(taken or wanted)[0]!r} is already in use by a running request", "rid")
        # Admitted and counted at once, so that concurrent submissions cannot both pass the limit; the adapters
        # checked under the same hold, so that an unload that starts after the check sees these requests.
        with self._lock:
            lora_names = self.lora.resolve(lora_path, len(ids))
            self._admit(sum(p.n for p in params))
            return self._start_admitted(ids, params, options, loop, rids, return_hidden_states, lora_names)

    def _start_admitted(self, ids: list[list[int]], params: list[SamplingParams], options: LogprobOptions | None,
                        loop: asyncio.AbstractEventLoop | None, rids: list[str | None] | None,
                        return_hidden_states: bool, lora_names: list[str | None]) -> list[RequestState]:
        states: list[RequestState] = []
        batch: list[GenerateRequest] = []  # sent as one message, so that the scheduler admits it together
        for i, (p_ids, p, lora) in enumerate(zip(ids, params, lora_names)):
            rid = rids[i] if rids else None
            copies = [self._new_state(p_ids, p, options, c, loop, rid if p.n == 1 else rid and f"{rid}-{c}",
                                      return_hidden_states, lora) for c in range(p.n)]
            states += [state for state, _ in copies]
            warm_req = None
            if p.n > 1 and not self.server_args.disable_radix_cache:
                # Prefill the prompt once; the copies are sent when its KV is in the radix cache.
                warm_params = SamplingParams(**{**vars(p), "n": 1, "max_new_tokens": 0})
                warm, warm_req = self._new_state(p_ids, warm_params, None, 0, None, None, lora_name=lora)
                warm.on_finish = lambda copies=copies: self._send([req for _, req in copies])
                batch.append(warm_req)
            else:
                batch += [req for _, req in copies]
            if self._dispatcher is not None:  # the copies go where the prompt is prefilled
                reqs = [req for _, req in copies] + ([warm_req] if warm_req is not None else [])
                rank = self._dispatcher.dispatch(p_ids, [(r.rid, self._budget(r)) for r in reqs])
                for r in reqs:
                    r.dp_rank = rank
        self._queued.update(s.rid for s in states)
        try:
            self._send(batch)
        except BaseException:
            self._queued.difference_update(s.rid for s in states)
            raise
        return states

    def _budget(self, req: GenerateRequest) -> int:
        """The tokens a request may hold: its prompt and at most its new tokens (the dispatcher's load)."""
        limit = req.sampling_params.max_new_tokens
        return len(req.input_ids) + (limit if limit is not None else self.info.context_length - len(req.input_ids))

    def _new_state(self, ids: list[int], p: SamplingParams, options: LogprobOptions | None, copy: int,
                   loop: asyncio.AbstractEventLoop | None, rid: str | None,
                   return_hidden_states: bool = False, lora_name: str | None = None
                   ) -> tuple[RequestState, GenerateRequest]:
        """Register a request; returns its state and the message that starts it."""
        decoder = RequestDecoder(self.tokenizer, p.stop, p.skip_special_tokens, p.spaces_between_special_tokens,
                                 p.no_stop_trim, prompt_ids=ids, stop_regex=p.stop_regex)
        with self._lock:
            if rid is not None and rid in self._states:
                raise InvalidRequestError(f"rid {rid!r} is already in use by a running request", "rid")
            rid = rid or uuid.uuid4().hex
            state = RequestState(rid, decoder, len(ids), time.time(), loop, logprobs={} if options else None,
                                 hidden_states=[] if return_hidden_states else None, lora_name=lora_name)
            self._states[rid] = state
        seed = p.seed + copy if p.seed is not None else self._rng.getrandbits(63)
        single = SamplingParams(**{**vars(p), "n": 1})
        return state, GenerateRequest(rid, ids, single, seed, options, return_hidden_states, lora_name=lora_name)

    def _register_reply(self, loop: asyncio.AbstractEventLoop | None, callback: Callable[[ControlReply], Any]
                        ) -> str:
        token = uuid.uuid4().hex
        with self._lock:
            self._replies[token] = (loop, callback)
        return token

    def _wait(self, states: list[RequestState]) -> None:
        bar = None
        if len(states) >= PROGRESS_BAR_MIN_PROMPTS:
            from tqdm import tqdm

            bar = tqdm(total=len(states), desc="generate")
        for s in states:
            s.done.wait()  # a dead scheduler or a shutdown fails the request, which sets `done` too
            if bar:
                bar.update(1)
        if bar:
            bar.close()

    def _stream(self, state: RequestState) -> Iterator[dict[str, Any]]:
        while True:
            chunk = state.chunks.get()
            if "error" in chunk:
                raise RequestFailedError(chunk["error"])
            raise_if_rejected(chunk["meta_info"]["finish_reason"])
            yield chunk
            if chunk["meta_info"]["finish_reason"] is not None:
                return

    def _receive_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._from_scheduler, zmq.POLLIN)
        while not self._closed:
            try:
                if not poller.poll(100):
                    self._watch_processes()
                    continue
                msg = self._from_scheduler.recv_pyobj()
            except zmq.ZMQError:
                return
            if isinstance(msg, SchedulerFailure):
                self._engine_failed(msg.reason)
                continue
            if isinstance(msg, ControlReply):
                with self._lock:
                    loop, callback = self._replies.pop(msg.token, (None, None))
                if callback is not None:
                    loop.call_soon_threadsafe(callback, msg) if loop is not None else callback(msg)
                continue
            if msg.stats is not None and self.metrics is not None:
                self.metrics.on_stats(msg.stats)
            for out in msg.outputs:
                try:
                    self._apply(out)
                except Exception as e:  # a bug here must fail its request, not leave every request hanging
                    logger.exception("internal error delivering the output of request %s", out.rid)
                    self._fail_request(out.rid, f"internal error while delivering the request's output: "
                                                f"{type(e).__name__}: {e}")

    def _watch_processes(self) -> None:
        """If a scheduler process died, fail every waiting request instead of leaving it hanging."""
        if self.dead_reason is not None or self._closed:
            return
        dead = self._schedulers.dead()
        if dead:
            self._engine_failed(f"the scheduler process died "
                                f"({', '.join(f'tp rank {r}: exit code {c}' for r, c in dead)})")

    def _engine_failed(self, reason: str) -> None:
        """The scheduler is gone (it reported an error, its watchdog fired, or it was killed): every request in flight
        fails with ``reason`` (RequestFailedError: HTTP 500), every later one is refused (EngineDeadError: 503)."""
        if self.dead_reason is not None or self._closed:
            return
        self.dead_reason = f"{reason}; the engine is dead, restart the server"
        logger.error("engine failed: %s", reason)
        self._fail_pending(self.dead_reason)

    def _fail_request(self, rid: str, reason: str) -> None:
        """Fail one request and tell the scheduler to drop it (its KV is freed at once)."""
        with self._lock:
            state = self._states.pop(rid, None)
            self._queued.discard(rid)
            if self._dispatcher is not None:
                self._dispatcher.finish(rid)
        if state is not None:
            state.fail(reason)
            self.abort(rid)

    def _fail_pending(self, reason: str) -> None:
        """Answer everything still waiting: requests fail with ``reason``, control questions with ok=False."""
        with self._lock:
            states, self._states = list(self._states.values()), {}
            replies, self._replies = list(self._replies.items()), {}
            self._queued.clear()
            if self._dispatcher is not None:
                self._dispatcher.clear()
        for state in states:
            state.fail(reason)
        for token, (loop, callback) in replies:
            reply = ControlReply(token, False, {"message": reason})
            loop.call_soon_threadsafe(callback, reply) if loop is not None else callback(reply)

    def _apply(self, out: TokenOutput) -> None:
        with self._lock:
            state = self._states.get(out.rid)
        if state is None:  # finished here already (stop string), the scheduler's last tokens are dropped
            return
        if out.new_ids or out.finished_reason is not None:
            self._queued.discard(out.rid)  # no longer queued: its first token came (or it ended without one)
        if faults.ACTIVE is not None:
            faults.ACTIVE.fire("detokenizer", (out.rid,))
        now = time.time()
        if self.metrics is not None:
            self.metrics.on_output(state, out, now)
        delta, matched = state.decoder.step(out.new_ids)
        state.output_ids.extend(out.new_ids)
        state.cached_tokens = out.cached_tokens
        logprob_delta = state.add_logprobs(out.logprobs) if out.logprobs and state.logprobs is not None else None
        if out.hidden_states and state.hidden_states is not None:
            state.hidden_states.extend(out.hidden_states)
        if matched is not None:
            state.finished_reason = {"type": "stop", "matched": matched}
            self.abort(out.rid)
        elif out.finished_reason is not None:
            delta += state.decoder.finish()
            # the final flush can still settle a stop string that was waiting for a longer alternative
            matched = state.decoder.matched
            state.finished_reason = {"type": "stop", "matched": matched} if matched else out.finished_reason
        state.text = state.decoder.text
        if state.finished_reason is not None:
            self._record_finish(state, now)
            with self._lock:
                del self._states[out.rid]
                if self._dispatcher is not None:
                    self._dispatcher.finish(out.rid)
            if state.on_finish is not None:
                state.on_finish()
        state.deliver({"text": delta, "output_ids": list(out.new_ids), "meta_info": state.meta_info(logprob_delta)})

    def _record_finish(self, state: RequestState, now: float) -> None:
        if self.metrics is not None:
            self.metrics.on_finish(state, now)
        if self.server_args.log_requests:
            logger.info("request finished: rid=%s finish=%s prompt_tokens=%d completion_tokens=%d cached_tokens=%d "
                        "e2e_latency=%.3f", state.rid, json.dumps(state.finished_reason, separators=(",", ":")),
                        state.prompt_tokens, len(state.output_ids), state.cached_tokens, now - state.created)
