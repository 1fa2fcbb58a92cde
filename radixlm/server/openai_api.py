"""OpenAI-compatible ``/v1/chat/completions`` and ``/v1/completions``: request -> engine requests, engine chunks ->
OpenAI responses and server-sent events."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from radixlm.errors import InvalidRequestError
from radixlm.sampling.logprobs import LogprobOptions
from radixlm.server.protocol import ChatCompletionRequest, CompletionRequest, TextPart, params_named
from radixlm.server.streams import merge_streams, sse, wait_all
from radixlm.server.tool_calls import ToolCallStreamer, parse_tool_calls, structural_tag

if TYPE_CHECKING:
    from fastapi import Request

    from radixlm.engine.engine import Engine
    from radixlm.engine.request_state import RequestState

# The engine's names of request fields -> the OpenAI request's (the `param` of a 400).
_CHAT_PARAMS = {"prompt": "messages", "input_ids": "messages", "max_new_tokens": "max_tokens",
                "min_new_tokens": "min_tokens", "structural_tag": "tools", "json_schema": "response_format",
                "lora_path": "model"}
_COMPLETION_PARAMS = {"input_ids": "prompt", "max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens",
                      "lora_path": "model"}


class OpenAIServing:
    def __init__(self, engine: "Engine", model_name: str, chat_template: str | None):
        self.engine = engine
        self.model_name = model_name
        self.chat_template = chat_template
        self.tool_call_parser = engine.server_args.tool_call_parser

    # ------------------------------------------------------------------ chat
    async def chat(self, body: ChatCompletionRequest, raw: "Request") -> dict[str, Any] | AsyncIterator[str]:
        self.engine.check_ready()
        tools = bool(body.tools) and body.tool_choice != "none"
        prompt_ids = await asyncio.to_thread(self._render_chat, body, tools)
        max_new = body.max_completion_tokens or body.max_tokens
        options = LogprobOptions(-1, body.top_logprobs or 0) if body.logprobs else None
        if body.top_logprobs and not body.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", "top_logprobs")
        params = body.sampling_params(max_new)
        params.update(_response_format_params(body))
        if tools:
            if body.response_format is not None and body.response_format.type != "text":
                raise InvalidRequestError("tools and response_format cannot be combined", "response_format")
            params["structural_tag"] = structural_tag(body.tools, body.tool_choice, body.parallel_tool_calls,
                                                      self.tool_call_parser)
        states = await self._submit(prompt_ids, params, options, body.rid, self.adapter_of(body.model))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return self._chat_stream(body, states, rid, created, tools)
        with params_named(_CHAT_PARAMS):  # a grammar the scheduler rejects is a 400 naming the request's field
            results = await wait_all(self.engine, states, raw)
        choices = []
        for i, result in enumerate(results):
            meta = result["meta_info"]
            reason, matched = _finish(meta)
            message: dict[str, Any] = {"role": "assistant", "content": result["text"], "tool_calls": None}
            if tools:
                content, calls = parse_tool_calls(result["text"], self.tool_call_parser)
                if calls:
                    message = {"role": "assistant", "content": content,
                               "tool_calls": [c.to_openai() for c in calls]}
                    reason = "tool_calls" if reason == "stop" else reason
            choices.append({
                "index": i, "message": message,
                "logprobs": {"content": self._chat_logprobs(meta)} if body.logprobs else None,
                "finish_reason": reason, "matched_stop": matched,
            })
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.response_model(body.model),
                "choices": choices, "usage": _usage([results[0]["meta_info"]], results)}

    async def _chat_stream(self, body: ChatCompletionRequest, states: list["RequestState"], rid: str,
                           created: int, tools: bool) -> AsyncIterator[str]:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(choices: list[dict[str, Any]]) -> str:
            out = {"id": rid, "object": "chat.completion.chunk", "created": created,
                   "model": self.response_model(body.model), "choices": choices}
            if include_usage:
                out["usage"] = None
            return sse(out)

        for i in range(len(states)):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        metas: dict[int, dict[str, Any]] = {}
        streamers = [ToolCallStreamer(self.tool_call_parser) for _ in states] if tools else None
        async for i, piece in merge_streams(self.engine, states):
            meta = piece["meta_info"]
            reason, matched = _finish(meta)
            logprobs = {"content": self._chat_logprobs(meta)} if body.logprobs and piece["output_ids"] else None
            text, delta = piece["text"], {}
            if streamers is not None:
                text = streamers[i].feed(text)
                if reason:
                    rest, calls = streamers[i].finish()
                    text += rest
                    if calls:
                        delta["tool_calls"] = [c.to_openai(index=k) for k, c in enumerate(calls)]
                        reason = "tool_calls" if reason == "stop" else reason
            if text:
                delta["content"] = text
            if delta or logprobs or reason:
                choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
                if reason:
                    choice["matched_stop"] = matched
                yield chunk([choice])
            if reason:
                metas[i] = meta
        if include_usage:
            results = [{"meta_info": metas[i]} for i in sorted(metas)]
            yield sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                       "model": self.response_model(body.model), "choices": [],
                       "usage": _usage([metas[min(metas)]] if metas else [], results)})
        yield "data: [DONE]\n\n"

    def _render_chat(self, body: ChatCompletionRequest, tools: bool) -> list[int]:
        # The rendered text holds every message's content, so contents too long to fit refuse it unrendered.
        self.engine.check_prompt_chars(sum(_content_chars(m.content) for m in body.messages), "messages")
        messages = []
        for m in body.messages:
            if isinstance(m.content, list):
                if any(not isinstance(part, TextPart) for part in m.content):
                    raise InvalidRequestError("this model takes text only; image, audio and video content parts "
                                              "are not supported", "messages")
                content: str | None = "".join(part.text for part in m.content)
            else:
                content = m.content
            message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                                       "content": content or ""}
            for key in ("name", "tool_calls", "tool_call_id"):
                if getattr(m, key) is not None:
                    message[key] = getattr(m, key)
            messages.append(message)
        import jinja2  # transformers renders chat templates with it

        tokenizer = self.engine.require_tokenizer()
        try:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=messages[-1]["role"] != "assistant",
                chat_template=self.chat_template, tools=body.tools if tools else None,
                **(body.chat_template_kwargs or {}))
        # A template rejects a conversation with a TemplateError (its raise_exception, an undefined it needs); a
        # message or tool of the wrong shape fails inside a filter (tojson of an undefined) with a TypeError;
        # chat_template_kwargs that transformers cannot combine (continue_final_message with a generation prompt,
        # return_assistant_tokens_mask without tokenizing) raise a ValueError.
        except (jinja2.TemplateError, TypeError, ValueError) as e:
            raise InvalidRequestError(f"the chat template rejected these messages: {e}", "messages") from e
        return tokenizer(text, add_special_tokens=False).input_ids

    def _chat_logprobs(self, meta: dict[str, Any]) -> list[dict[str, Any]]:
        tops = meta.get("output_top_logprobs") or []
        content = []
        for j, (logprob, tid, _) in enumerate(meta.get("output_token_logprobs") or []):
            alts = tops[j] if j < len(tops) and tops[j] else []
            content.append({**self._token_entry(tid, logprob),
                            "top_logprobs": [self._token_entry(t, lp) for lp, t, _ in alts]})
        return content

    def _token_entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        token = self._token_text(token_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    # ------------------------------------------------------------------ completions
    async def completions(self, body: CompletionRequest, raw: "Request") -> dict[str, Any] | AsyncIterator[str]:
        self.engine.check_ready()
        if body.suffix:
            raise InvalidRequestError("suffix is not supported", "suffix")
        prompts = body.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise InvalidRequestError("prompt must not be empty", "prompt")
        options = None
        if body.logprobs is not None:
            options = LogprobOptions(0 if body.echo else -1, body.logprobs)
        texts = [p for p in prompts if isinstance(p, str)]
        ids = [p for p in prompts if not isinstance(p, str)]
        if texts and ids:
            raise InvalidRequestError("prompt must be all strings or all token-id lists", "prompt")
        with params_named(_COMPLETION_PARAMS):
            # OpenAI's default of 16 tokens applies only where it fits; a max_tokens the client sent must fit.
            explicit = "max_tokens" in body.model_fields_set
            prompt_ids, params, _ = await asyncio.to_thread(
                self.engine.prepare, texts or None, body.sampling_params(body.max_tokens if explicit else None),
                ids or None, {"max_new_tokens": body.max_tokens})
            states = await self.engine.submit(prompt_ids, params, options, _rids(body.rid, len(prompt_ids)),
                                              lora_path=self.adapter_of(body.model))
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echoes = ([await asyncio.to_thread(self.engine.require_tokenizer().decode, p) for p in prompt_ids] if body.echo
                  else ["" for _ in prompt_ids])
        n = body.n
        if body.stream:
            return self._completion_stream(body, states, rid, created, echoes, n)
        with params_named(_COMPLETION_PARAMS):
            results = await wait_all(self.engine, states, raw)
        choices = []
        for i, result in enumerate(results):
            meta = result["meta_info"]
            reason, matched = _finish(meta)
            choices.append({"index": i, "text": echoes[i // n] + result["text"],
                            "logprobs": self._completion_logprobs(meta, body.echo) if options else None,
                            "finish_reason": reason, "matched_stop": matched})
        firsts = [results[k * n]["meta_info"] for k in range(len(prompt_ids))]
        return {"id": rid, "object": "text_completion", "created": created, "model": self.response_model(body.model),
                "choices": choices, "usage": _usage(firsts, results)}

    async def _completion_stream(self, body: CompletionRequest, states: list["RequestState"], rid: str,
                                 created: int, echoes: list[str], n: int) -> AsyncIterator[str]:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(choice: dict[str, Any]) -> str:
            out = {"id": rid, "object": "text_completion", "created": created, "model": self.response_model(body.model),
                   "choices": [choice]}
            if include_usage:
                out["usage"] = None
            return sse(out)

        started, metas = set(), {}
        async for i, piece in merge_streams(self.engine, states):
            meta = piece["meta_info"]
            reason, matched = _finish(meta)
            echo = echoes[i // n] if i not in started else ""
            first = i not in started
            started.add(i)
            logprobs = (self._completion_logprobs(meta, body.echo and first)
                        if body.logprobs is not None and (piece["output_ids"] or first) else None)
            if echo or piece["text"] or logprobs or reason:
                choice = {"index": i, "text": echo + piece["text"], "logprobs": logprobs, "finish_reason": reason}
                if reason:
                    choice["matched_stop"] = matched
                yield chunk(choice)
            if reason:
                metas[i] = meta
        if include_usage:
            results = [{"meta_info": metas[i]} for i in sorted(metas)]
            firsts = [metas[k] for k in sorted(metas) if k % n == 0]
            yield sse({"id": rid, "object": "text_completion", "created": created,
                       "model": self.response_model(body.model), "choices": [], "usage": _usage(firsts, results)})
        yield "data: [DONE]\n\n"

    def _completion_logprobs(self, meta: dict[str, Any], with_prompt: bool) -> dict[str, Any]:
        entries = list(meta.get("input_token_logprobs") or []) if with_prompt else []
        tops = list(meta.get("input_top_logprobs") or []) if with_prompt else []
        tops += [None] * (len(entries) - len(tops))
        entries += meta.get("output_token_logprobs") or []
        tops += meta.get("output_top_logprobs") or [None] * len(meta.get("output_token_logprobs") or [])
        tokens = [self._token_text(tid) for _, tid, _ in entries]
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [lp for lp, _, _ in entries],
            "top_logprobs": [{self._token_text(t): lp for lp, t, _ in top} if top else None for top in tops],
            "text_offset": offsets,
        }

    # ------------------------------------------------------------------ shared
    def adapter_of(self, model: str | None) -> str | None:
        """The LoRA adapter a request's ``model`` names: ``"<served model name>:<adapter>"``; any other model
        (the served name itself, none, or another name, which this server has always answered with its model)
        is the base model.  The engine refuses an adapter it does not serve (a 400 naming ``model``)."""
        prefix = f"{self.model_name}:"
        return model[len(prefix):] if model is not None and model.startswith(prefix) else None

    def response_model(self, model: str | None) -> str:
        """The ``model`` of a response: the adapter's ``<base>:<adapter>`` as requested, else the served name."""
        return model if self.adapter_of(model) is not None else self.model_name

    async def _submit(self, prompt_ids: list[int], params: dict[str, Any], options: LogprobOptions | None,
                      rid: str | None, adapter: str | None) -> list["RequestState"]:
        with params_named(_CHAT_PARAMS):
            ids, parsed, _ = await asyncio.to_thread(self.engine.prepare, None, params, prompt_ids)
            return await self.engine.submit(ids, parsed, options, [rid] if rid else None, lora_path=adapter)

    def _token_text(self, token_id: int) -> str:
        return self.engine.require_tokenizer().decode([token_id])


def _response_format_params(body: ChatCompletionRequest) -> dict[str, Any]:
    """OpenAI ``response_format`` as an engine constraint: ``json_object`` is any JSON object, ``json_schema`` the
    given schema (``strict`` or not, the output always validates: the grammar is the schema)."""
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return {}
    if body.regex is not None or body.ebnf is not None:
        raise InvalidRequestError("response_format and regex/ebnf are mutually exclusive", "response_format")
    if fmt.type == "json_object":
        return {"json_schema": json.dumps({"type": "object"})}
    spec = fmt.json_schema or {}
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise InvalidRequestError("response_format.json_schema.schema must be a JSON schema object",
                                  "response_format")
    return {"json_schema": json.dumps(schema)}


def _content_chars(content: str | list[Any] | None) -> int:
    if isinstance(content, list):
        return sum(len(part.text) for part in content if isinstance(part, TextPart))
    return len(content or "")


def _rids(rid: str | None, count: int) -> list[str | None] | None:
    if rid is None:
        return None
    return [rid] if count == 1 else [f"{rid}-{i}" for i in range(count)]


def _finish(meta: dict[str, Any]) -> tuple[str | None, Any]:
    reason = meta.get("finish_reason")
    if reason is None:
        return None, None
    kind = reason["type"]
    return ("stop" if kind == "stop" else "length" if kind == "length" else "abort"), reason.get("matched")


def _usage(prompt_metas: list[dict[str, Any]], results: list[dict[str, Any]]) -> dict[str, Any]:
    prompt = sum(m["prompt_tokens"] for m in prompt_metas)
    completion = sum(r["meta_info"]["completion_tokens"] for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(m["cached_tokens"] for m in prompt_metas)}}


__all__ = ["OpenAIServing"]
