"""Request bodies of the HTTP API (pydantic), and the OpenAI-style error body.

Type and range errors are caught here, before a request reaches the engine, and come back as HTTP 400 naming the
field.  Unknown fields are ignored, as OpenAI-compatible servers do (clients send vendor extras); the native
``sampling_params`` object stays strict (a typo there raises).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from radixlm.errors import InvalidRequestError


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingFields(_Body):
    """Fields shared by chat and completions, with SGLang's extras."""

    model: str | None = None
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
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
        }
        if self.temperature is not None:
            params["temperature"] = self.temperature
        if self.top_p is not None:
            params["top_p"] = self.top_p
        return params


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImagePart(_Body):
    type: Literal["image_url", "input_image", "input_audio", "video_url"]


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | ImagePart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatCompletionRequest(_SamplingFields):
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
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None


class GenerateRequestBody(_Body):
    """SGLang's native ``/generate``."""

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


class TokenizeRequest(_Body):
    prompt: str
    add_special_tokens: bool = True
    model: str | None = None


class DetokenizeRequest(_Body):
    tokens: list[int]
    model: str | None = None


class AbortRequestBody(_Body):
    rid: str | None = None
    abort_all: bool = False


def error_body(message: str, status: int, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    err_type = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                500: "internal_server_error", 503: "service_unavailable"}.get(status, "server_error")
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


@contextmanager
def params_named(names: dict[str, str]) -> Iterator[None]:
    """Around calls into the engine: an InvalidRequestError's ``param``, an engine name (``max_new_tokens``,
    ``input_ids``), becomes the field of this API's request that it came from (``names``: engine -> API)."""
    try:
        yield
    except InvalidRequestError as e:
        e.param = names.get(e.param, e.param)
        raise
