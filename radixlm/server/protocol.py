"""Request bodies of the HTTP API (pydantic), and the OpenAI-style error body.

Type and range errors are caught here, before a request reaches the engine, and come back as HTTP 400 naming the
field.

Unknown fields policy: a body field that this server does not know is accepted and ignored, as OpenAI-compatible
servers do (clients and SDKs send vendor extras, e.g. another server's sampling options), and the first request
carrying each such name logs one WARNING per process ("ignoring unknown field 'foo' in /v1/chat/completions
requests"), so that an operator sees what clients expect and does not get.  This holds for the OpenAI routes and the
top level of ``/generate`` and the other JSON routes, nested objects included (messages, response_format, ...).  The
native ``sampling_params`` object stays strict: an unknown key there is a 400 (a typo must not be ignored).

A field another SGLang component sends at its no-op value is not unknown (``NEUTRAL_FIELDS``): ``sglang-router``
re-serializes every body it forwards with SGLang's defaults filled in (``"log_metrics": true``, ``"model": null``,
``"separate_reasoning": true``, ...), which asks for nothing this server does not do; the same field with any other
value is an unknown field as above.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from radixlm.errors import InvalidRequestError
from radixlm.sampling.limits import MAX_N

logger = logging.getLogger(__name__)

# Distinct unknown field names remembered (and logged once each); beyond, new names are no longer logged, so that
# clients sending ever-new names cannot grow the set or flood the log.
MAX_LOGGED_UNKNOWN_FIELDS = 1000
_UNKNOWN_NAME_CHARS = 100  # of a logged name
_logged_unknown: set[tuple[str, str]] = set()
_logged_lock = threading.Lock()


def _log_unknown_field(where: str, name: str) -> None:
    """One WARNING per process for each (place, unknown field name)."""
    key = (where, name[:_UNKNOWN_NAME_CHARS])
    with _logged_lock:
        if key in _logged_unknown or len(_logged_unknown) > MAX_LOGGED_UNKNOWN_FIELDS:
            return
        _logged_unknown.add(key)
        if len(_logged_unknown) > MAX_LOGGED_UNKNOWN_FIELDS:
            logger.warning("more than %d distinct unknown request fields seen; no longer logging new ones",
                           MAX_LOGGED_UNKNOWN_FIELDS)
            return
    logger.warning("ignoring unknown field %r in %s", key[1], where)


# SGLang fields this server does not implement -> the value that asks for nothing (SGLang's default), per route
# (``_Body.where``); what sglang-router 0.3.2 adds to every forwarded body.
_GENERATE_NEUTRAL = {"model": None, "return_text_in_logprobs": False, "log_metrics": True, "background": False,
                     "no_logs": False, "return_bytes": False, "return_entropy": False}
_CHAT_NEUTRAL = {"continue_final_message": False, "separate_reasoning": True, "stream_reasoning": True,
                 "return_hidden_states": False}
NEUTRAL_FIELDS: dict[str, dict[str, Any]] = {
    "/generate requests": _GENERATE_NEUTRAL,
    "/v1/chat/completions requests": _CHAT_NEUTRAL,
    "/v1/completions requests": {"return_hidden_states": False},
}


class _Body(BaseModel):
    # NaN and Infinity (JSON tokens pydantic accepts, and 1e999) are no sampling parameter: a 400, not NaN logits
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    where: ClassVar[str] = "request bodies"  # what the unknown-field warning names

    @model_validator(mode="wrap")
    @classmethod
    def _note_unknown_fields(cls, data: Any, handler: Any) -> Any:
        body = handler(data)  # first: a union member that does not fit (a content part's type) logs nothing
        if isinstance(data, dict):
            neutral = NEUTRAL_FIELDS.get(cls.where, {})
            for name, value in data.items():
                if name not in cls.model_fields and not (name in neutral and _same(value, neutral[name])):
                    _log_unknown_field(cls.where, str(name))
        return body


def _same(value: Any, neutral: Any) -> bool:
    """``value`` is ``neutral`` as JSON has it (``0`` is not ``false``)."""
    return type(value) is type(neutral) and value == neutral


class StreamOptions(_Body):
    where = "stream_options"
    include_usage: bool = False


class _SamplingFields(_Body):
    """Fields shared by chat and completions, with SGLang's extras."""

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    stop_regex: str | list[str] | None = None
    seed: int | None = None
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # extras (SGLang / vLLM names)
    top_k: int = -1
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    regex: str | None = None
    ebnf: str | None = None
    rid: str | None = None

    def sampling_params(self, max_new_tokens: int | None) -> dict[str, Any]:
        """SGLang ``sampling_params`` for the engine (which validates the rest)."""
        params: dict[str, Any] = {
            "max_new_tokens": max_new_tokens, "n": self.n, "stop": self.stop, "seed": self.seed,
            "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
            "logit_bias": self.logit_bias, "top_k": self.top_k, "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty, "min_new_tokens": self.min_tokens,
            "ignore_eos": self.ignore_eos, "stop_token_ids": self.stop_token_ids,
            "skip_special_tokens": self.skip_special_tokens,
            "spaces_between_special_tokens": self.spaces_between_special_tokens,
            "no_stop_trim": self.no_stop_trim, "regex": self.regex, "ebnf": self.ebnf,
            "stop_regex": self.stop_regex,
        }
        if self.temperature is not None:
            params["temperature"] = self.temperature
        if self.top_p is not None:
            params["top_p"] = self.top_p
        return params


class TextPart(_Body):
    where = "message content parts"
    type: Literal["text"]
    text: str


class ImagePart(_Body):
    where = "message content parts"
    type: Literal["image_url", "input_image", "input_audio", "video_url"]


class ChatMessage(_Body):
    where = "/v1/chat/completions messages"
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | ImagePart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ResponseFormat(_Body):
    where = "response_format"
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatCompletionRequest(_SamplingFields):
    where = "/v1/chat/completions requests"
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(_SamplingFields):
    where = "/v1/completions requests"
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None


class GenerateRequestBody(_Body):
    """SGLang's native ``/generate``."""

    where = "/generate requests"

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    stream: bool = False
    return_logprob: bool = False
    logprob_start_len: int | None = None
    top_logprobs_num: int | None = Field(None, ge=0)
    token_ids_logprob: list[int] | None = None
    return_hidden_states: bool = False
    rid: str | list[str] | None = None
    lora_path: str | list[str | None] | None = None  # a served LoRA adapter's name, or one per prompt


class LoadLoRAAdapterRequest(_Body):
    where = "/load_lora_adapter requests"
    lora_name: str = Field(..., min_length=1)
    lora_path: str = Field(..., min_length=1)


class UnloadLoRAAdapterRequest(_Body):
    where = "/unload_lora_adapter requests"
    lora_name: str = Field(..., min_length=1)


class TokenizeRequest(_Body):
    where = "/v1/tokenize requests"
    prompt: str
    add_special_tokens: bool = True
    model: str | None = None


class DetokenizeRequest(_Body):
    where = "/v1/detokenize requests"
    tokens: list[int]
    model: str | None = None


class AbortRequestBody(_Body):
    where = "/abort_request requests"
    rid: str | None = None
    abort_all: bool = False


@contextmanager
def params_named(names: dict[str, str]) -> Iterator[None]:
    """Around calls into the engine: an InvalidRequestError's ``param``, an engine name (``max_new_tokens``,
    ``input_ids``), becomes the field of this API's request that it came from (``names``: engine -> API)."""
    try:
        yield
    except InvalidRequestError as e:
        e.param = names.get(e.param, e.param)
        raise
