"""SGLang-compatible native API: ``/generate`` (single, batch, streaming) and the admin routes' payloads, in the
shapes SGLang's own router (``sglang-router``) reads: ``/server_info`` and ``/model_info`` (a worker's metadata,
``served_model_name`` its model id), ``/get_load`` (its load per DP rank)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from radixlm.errors import InvalidRequestError
from radixlm.sampling.logprobs import LogprobOptions
from radixlm.server.protocol import GenerateRequestBody, params_named
from radixlm.server.streams import merge_streams, sse, wait_all

if TYPE_CHECKING:
    from fastapi import Request

    from radixlm.engine.engine import Engine

HEALTH_GENERATE_TIMEOUT_S = 30.0
_NATIVE_PARAMS = {"prompt": "text"}  # the engine's name of a request field -> /generate's (the `param` of a 400)


class NativeServing:
    def __init__(self, engine: "Engine", model_name: str):
        self.engine = engine
        self.model_name = model_name

    async def generate(self, body: GenerateRequestBody, raw: "Request") -> Any:
        """One prompt -> one result dict; a batch (or ``n > 1``) -> a list.  Streaming sends SGLang's chunks:
        the text and output ids generated so far, ``meta_info``, and ``index`` for batches."""
        self.engine.check_ready()
        with params_named(_NATIVE_PARAMS):
            prompt_ids, params, single = await asyncio.to_thread(
                self.engine.prepare, body.text, body.sampling_params, body.input_ids)
            options = LogprobOptions.from_request(body.return_logprob, body.logprob_start_len,
                                                  body.top_logprobs_num, body.token_ids_logprob)
            rids = [body.rid] if isinstance(body.rid, str) else body.rid
            if rids is not None and len(rids) != len(prompt_ids):
                raise InvalidRequestError(f"{len(rids)} rids for {len(prompt_ids)} prompts", "rid")
            states = await self.engine.submit(prompt_ids, params, options, rids, body.return_hidden_states,
                                              body.lora_path)
        one = single and len(states) == 1
        if body.stream:
            return self._stream(states, one)
        results = await wait_all(self.engine, states, raw)
        return results[0] if one else results

    async def _stream(self, states: list, one: bool) -> AsyncIterator[str]:
        async for i, _ in merge_streams(self.engine, states):
            state = states[i]
            out = {"text": state.text, "output_ids": list(state.output_ids), "meta_info": state.meta_info()}
            if not one:
                out["index"] = i
            yield sse(out)
        yield "data: [DONE]\n\n"

    async def health_generate(self) -> bool:
        """Run one real one-token generation through the whole engine."""
        token = getattr(self.engine.tokenizer, "bos_token_id", None)
        token = token if token is not None else 0
        ids, params, _ = self.engine.prepare(None, {"max_new_tokens": 1, "temperature": 0.0}, [token])
        states = await self.engine.submit(ids, params, None)
        await asyncio.wait_for(wait_all(self.engine, states, None), HEALTH_GENERATE_TIMEOUT_S)
        return True

    def model_info(self) -> dict[str, Any]:
        args = self.engine.server_args
        return {"model_path": self.engine.model_path, "tokenizer_path": args.tokenizer_path or self.engine.model_path,
                "served_model_name": self.model_name, "is_generation": True,
                "context_length": self.engine.info.context_length, "vocab_size": self.engine.info.vocab_size}

    async def server_info(self) -> dict[str, Any]:
        from radixlm import __version__

        reply = await self.engine.async_control("get_state")
        info = {k: v for k, v in dataclasses.asdict(self.engine.server_args).items() if k != "api_key"}
        info.update(self.model_info())  # the effective names and paths, where the flags may be unset
        info.update(version=__version__, max_total_num_tokens=self.engine.info.max_total_num_tokens,
                    max_running_requests=self.engine.info.max_running_requests, internal_states=[reply.payload],
                    scheduler_pids=self.engine.scheduler_pids(),
                    num_frontend_reqs=self.engine.num_tracked_requests())
        return info

    async def load(self) -> list[dict[str, int]]:
        """SGLang's ``/get_load`` (``load_report``) from the schedulers' live state."""
        reply = await self.engine.async_control("get_state")
        return load_report(reply.payload)


def load_report(state: dict[str, Any]) -> list[dict[str, int]]:
    """One entry per DP rank (one without DP attention), SGLang's shape: ``num_reqs`` (running + queued,
    grammar-compiling included), ``num_waiting_reqs`` (queued), ``num_tokens`` (KV tokens that running requests
    hold, plus the prompt tokens of the queued ones: the work a rank has before a new request; sglang-router sums
    it over ranks as the worker's load).  ``state``: the ``get_state`` payload (``Scheduler.state()``; under DP
    attention the ranks' under ``"dp"``)."""
    report = []
    for rank, s in enumerate(state.get("dp", [state])):
        waiting = s["num_waiting_reqs"] + s["num_grammar_queue_reqs"]
        held = s["max_total_num_tokens"] - s["available_kv_tokens"] - s["evictable_kv_tokens"]
        report.append({"dp_rank": rank, "num_reqs": s["num_running_reqs"] + waiting, "num_waiting_reqs": waiting,
                       "num_tokens": held + s["num_waiting_tokens"]})
    return report
