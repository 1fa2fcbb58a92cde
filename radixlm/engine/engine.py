"""The offline ``Engine``: tokenizer and detokenizer in this process, the scheduler (one process per TP rank)
behind ZMQ.  SGLang-compatible shape::

    with radixlm.Engine() as engine:              # the embedded model
        out = engine.generate("The capital of France is", {"max_new_tokens": 16, "temperature": 0})
        out["text"], out["output_ids"], out["meta_info"]["finish_reason"]
"""

from __future__ import annotations

import asyncio
import atexit
import multiprocessing as mp
import queue
import random
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import zmq

from radixlm.config import ServerArgs
from radixlm.engine.detokenizer import RequestDecoder
from radixlm.engine.io_struct import AbortRequest, BatchTokenOutput, GenerateRequest, SchedulerInfo, TokenOutput
from radixlm.engine.scheduler_process import run_scheduler_process
from radixlm.models.embedded import embedded_model_path
from radixlm.sampling import SamplingParams
from radixlm.sampling.logprobs import LogprobOptions

PROGRESS_BAR_MIN_PROMPTS = 64


@dataclass
class _RequestState:
    rid: str
    decoder: RequestDecoder
    prompt_tokens: int
    created: float
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finished_reason: dict[str, Any] | None = None
    cached_tokens: int = 0
    logprobs: dict[str, list] | None = None  # accumulated SGLang-style logprob fields, when asked for
    chunks: "queue.Queue[dict[str, Any]]" = field(default_factory=queue.Queue)  # streamed deltas
    done: threading.Event = field(default_factory=threading.Event)
    on_finish: Callable[[], None] | None = None  # e.g. release the n copies waiting on a shared prompt

    def meta_info(self, logprobs: dict[str, list] | None = None) -> dict[str, Any]:
        meta = {"id": self.rid, "prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.output_ids),
                "cached_tokens": self.cached_tokens, "finish_reason": self.finished_reason,
                "e2e_latency": time.time() - self.created}
        meta.update(logprobs if logprobs is not None else self.logprobs or {})
        return meta

    def add_logprobs(self, new: dict[str, list]) -> dict[str, list]:
        """Append a scheduler delta (entries (logprob, id)) as SGLang's [logprob, id, None]; return the delta."""
        delta = {key: [_entry(e) for e in entries] for key, entries in new.items()}
        for key, entries in delta.items():
            self.logprobs.setdefault(key, []).extend(entries)
        return delta

    def result(self) -> dict[str, Any]:
        return {"text": self.text, "output_ids": list(self.output_ids), "meta_info": self.meta_info()}


def _entry(e: Any) -> Any:
    """(logprob, id) -> [logprob, id, None]; lists of them (top-k) recursively; None stays None."""
    if e is None:
        return None
    if isinstance(e, tuple):
        return [e[0], e[1], None]
    return [_entry(x) for x in e]


class Engine:
    def __init__(self, model_path: str | None = None, **server_args: Any):
        from transformers import AutoTokenizer

        self.server_args = ServerArgs(model_path=model_path, **server_args)
        if self.server_args.tp_size > 1 and self.server_args.dist_init_addr is None:
            self.server_args = self.server_args.replace(dist_init_addr=f"127.0.0.1:{_free_port()}")
        path = self.server_args.model_path or embedded_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(self.server_args.tokenizer_path or path)
        self._rng = random.Random(self.server_args.random_seed)
        self._states: dict[str, _RequestState] = {}
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()  # ZMQ sockets are not thread-safe; the receiver thread sends too
        self._closed = False

        self._ipc_dir = tempfile.TemporaryDirectory(prefix="radixlm-")
        in_addr, out_addr = f"ipc://{self._ipc_dir.name}/in", f"ipc://{self._ipc_dir.name}/out"
        self._zmq = zmq.Context()
        self._to_scheduler = self._zmq.socket(zmq.PUSH)
        self._to_scheduler.bind(in_addr)
        self._from_scheduler = self._zmq.socket(zmq.PULL)
        self._from_scheduler.bind(out_addr)

        ctx = mp.get_context("spawn")
        self._procs, pipes = [], []
        for rank in range(self.server_args.tp_size):
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=run_scheduler_process, daemon=True,
                               args=(self.server_args, rank, in_addr, out_addr, child))
            proc.start()
            self._procs.append(proc)
            pipes.append(parent)
        atexit.register(self.shutdown)
        infos = [self._wait_ready(p, proc) for p, proc in zip(pipes, self._procs)]
        self.info: SchedulerInfo = infos[0]
        self._receiver = threading.Thread(target=self._receive_loop, daemon=True, name="radixlm-receiver")
        self._receiver.start()

    def _wait_ready(self, pipe: Any, proc: mp.process.BaseProcess) -> SchedulerInfo:
        while not pipe.poll(0.5):
            if not proc.is_alive():
                self.shutdown()
                raise RuntimeError(f"scheduler process exited with code {proc.exitcode} while loading the model")
        msg = pipe.recv()
        if isinstance(msg, str):
            self.shutdown()
            raise RuntimeError(f"scheduler failed to start: {msg}")
        return msg

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
    ) -> dict[str, Any] | list[dict[str, Any]] | Iterator[dict[str, Any]]:
        """Generate for one prompt (returns a dict) or a batch (returns a list, in order).

        ``sampling_params`` uses SGLang's keys (``max_new_tokens``, ``temperature``, ``stop``, ...), one dict
        shared by the batch or one per prompt; ``n > 1`` returns n results per prompt (a list), the prompt
        prefilled once and shared through the radix cache.  With ``stream=True`` (single prompt, n = 1) an
        iterator of ``{"text": delta, "output_ids": new ids, "meta_info": ...}`` chunks is returned.

        ``return_logprob`` adds SGLang's ``output_token_logprobs`` ([logprob, token_id, None] per output token)
        and, from ``logprob_start_len`` on, ``input_token_logprobs``; ``top_logprobs_num`` adds
        ``*_top_logprobs``, ``token_ids_logprob`` adds ``*_token_ids_logprobs`` to ``meta_info``.
        """
        states, single = self._submit(prompt, sampling_params, input_ids,
                                      _logprob_options(return_logprob, logprob_start_len, top_logprobs_num,
                                                       token_ids_logprob))
        if stream:
            if not single:
                raise ValueError("stream=True takes a single prompt")
            return self._stream(states[0])
        self._wait(states)
        results = [s.result() for s in states]
        return results[0] if single else results

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
    ) -> dict[str, Any] | list[dict[str, Any]] | AsyncIterator[dict[str, Any]]:
        """Like ``generate``; with ``stream=True`` returns an async iterator of chunks."""
        states, single = self._submit(prompt, sampling_params, input_ids,
                                      _logprob_options(return_logprob, logprob_start_len, top_logprobs_num,
                                                       token_ids_logprob))
        if stream:
            if not single:
                raise ValueError("stream=True takes a single prompt")
            return self._astream(states[0])
        for s in states:
            await asyncio.to_thread(s.done.wait)
        results = [s.result() for s in states]
        return results[0] if single else results

    def abort(self, rid: str) -> None:
        """Stop request ``rid`` (``meta_info["id"]``); it finishes with ``{"type": "abort"}``."""
        self._send(AbortRequest(rid))

    def _send(self, msg: Any) -> None:
        with self._send_lock:
            self._to_scheduler.send_pyobj(msg)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            with self._send_lock:
                self._to_scheduler.send_pyobj(None, zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        for proc in getattr(self, "_procs", []):
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        self._zmq.destroy(linger=0)
        self._ipc_dir.cleanup()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ internals
    def _submit(self, prompt, sampling_params, input_ids, options: LogprobOptions | None
                ) -> tuple[list[_RequestState], bool]:
        if (prompt is None) == (input_ids is None):
            raise ValueError("pass exactly one of prompt and input_ids")
        if prompt is not None:
            single = isinstance(prompt, str)
            prompts = [prompt] if single else list(prompt)
            ids = [self.tokenizer(p).input_ids for p in prompts]
        else:
            single = not input_ids or isinstance(input_ids[0], int)
            ids = [list(input_ids)] if single else [list(x) for x in input_ids]
        n = len(ids)
        if isinstance(sampling_params, list):
            if len(sampling_params) != n:
                raise ValueError(f"{len(sampling_params)} sampling_params for {n} prompts")
            raw = sampling_params
        else:
            raw = [sampling_params or {}] * n
        params = [self._parse_params(p) for p in raw]
        if options and options.token_ids_logprob:
            bad = [t for t in options.token_ids_logprob if not 0 <= t < self.info.vocab_size]
            if bad:
                raise ValueError(f"token_ids_logprob has ids outside the vocabulary [0, {self.info.vocab_size}): {bad}")
        for p_ids in ids:
            if not p_ids:
                raise ValueError("the prompt is empty")
            if len(p_ids) >= self.info.context_length:
                raise ValueError(f"the prompt has {len(p_ids)} tokens; the context length is {self.info.context_length}")
        states: list[_RequestState] = []
        for p_ids, p in zip(ids, params):
            copies = [self._new_state(p_ids, p, options, i) for i in range(p.n)]
            states += [state for state, _ in copies]
            if p.n > 1 and not self.server_args.disable_radix_cache:
                # Prefill the prompt once; the copies are sent when its KV is in the radix cache.
                warm_params = SamplingParams(**{**vars(p), "n": 1, "max_new_tokens": 0})
                warm, warm_req = self._new_state(p_ids, warm_params, None, 0)
                warm.on_finish = lambda copies=copies: [self._send(req) for _, req in copies]
                self._send(warm_req)
            else:
                for _, req in copies:
                    self._send(req)
        if any(p.n > 1 for p in params):
            single = False
        return states, single

    def _new_state(self, ids: list[int], p: SamplingParams, options: LogprobOptions | None, copy: int
                   ) -> tuple[_RequestState, GenerateRequest]:
        """Register a request; returns its state and the message that starts it."""
        rid = uuid.uuid4().hex
        decoder = RequestDecoder(self.tokenizer, p.stop, p.skip_special_tokens, p.spaces_between_special_tokens,
                                 p.no_stop_trim, prompt_ids=ids)
        state = _RequestState(rid, decoder, len(ids), time.time(), logprobs={} if options else None)
        with self._lock:
            self._states[rid] = state
        seed = p.seed + copy if p.seed is not None else self._rng.getrandbits(63)
        single = SamplingParams(**{**vars(p), "n": 1})
        return state, GenerateRequest(rid, ids, single, seed, options)

    def _parse_params(self, raw: dict[str, Any] | SamplingParams) -> SamplingParams:
        p = raw if isinstance(raw, SamplingParams) else SamplingParams.from_dict(dict(raw))
        p = SamplingParams(**vars(p))
        p.normalize()
        p.verify(len(self.tokenizer))
        if p.json_schema or p.regex or p.ebnf:
            raise ValueError("structured output (json_schema/regex/ebnf) is not supported yet")
        return p

    def _wait(self, states: list[_RequestState]) -> None:
        bar = None
        if len(states) >= PROGRESS_BAR_MIN_PROMPTS:
            from tqdm import tqdm

            bar = tqdm(total=len(states), desc="generate")
        for s in states:
            while not s.done.wait(0.5):
                self._check_alive()
            if bar:
                bar.update(1)
        if bar:
            bar.close()

    def _check_alive(self) -> None:
        dead = [p.exitcode for p in self._procs if not p.is_alive()]
        if dead and not self._closed:
            raise RuntimeError(f"a scheduler process died (exit codes {dead}); the engine cannot continue")

    def _stream(self, state: _RequestState) -> Iterator[dict[str, Any]]:
        while True:
            try:
                chunk = state.chunks.get(timeout=0.5)
            except queue.Empty:
                self._check_alive()
                continue
            yield chunk
            if chunk["meta_info"]["finish_reason"] is not None:
                return

    async def _astream(self, state: _RequestState) -> AsyncIterator[dict[str, Any]]:
        while True:
            chunk = await asyncio.to_thread(state.chunks.get)
            yield chunk
            if chunk["meta_info"]["finish_reason"] is not None:
                return

    def _receive_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._from_scheduler, zmq.POLLIN)
        while not self._closed:
            try:
                if not poller.poll(100):
                    continue
                batch: BatchTokenOutput = self._from_scheduler.recv_pyobj()
            except zmq.ZMQError:
                return
            for out in batch.outputs:
                self._apply(out)

    def _apply(self, out: TokenOutput) -> None:
        with self._lock:
            state = self._states.get(out.rid)
        if state is None:  # finished here already (stop string), the scheduler's last tokens are dropped
            return
        delta, matched = state.decoder.step(out.new_ids)
        state.output_ids.extend(out.new_ids)
        state.cached_tokens = out.cached_tokens
        logprob_delta = state.add_logprobs(out.logprobs) if out.logprobs and state.logprobs is not None else None
        if matched is not None:
            state.finished_reason = {"type": "stop", "matched": matched}
            self.abort(out.rid)
        elif out.finished_reason is not None:
            delta += state.decoder.finish()
            # the final flush can still settle a stop string that was waiting for a longer alternative
            matched = state.decoder.matched
            state.finished_reason = {"type": "stop", "matched": matched} if matched else out.finished_reason
        state.text = state.decoder.text
        state.chunks.put({"text": delta, "output_ids": list(out.new_ids), "meta_info": state.meta_info(logprob_delta)})
        if state.finished_reason is not None:
            with self._lock:
                del self._states[out.rid]
            if state.on_finish is not None:
                state.on_finish()
            state.done.set()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _logprob_options(return_logprob: bool, start: int | None, top: int | None, ids: list[int] | None
                     ) -> LogprobOptions | None:
    if not return_logprob:
        return None
    if top is not None and top < 0:
        raise ValueError(f"top_logprobs_num must be >= 0, got {top}")
    return LogprobOptions(-1 if start is None else start, top or 0, list(ids) if ids else None)
