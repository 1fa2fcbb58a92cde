"""What the front end checks before a request costs anything: ``RequestValidator`` turns what a caller sent (text
or token ids, SGLang ``sampling_params``) into token ids and checked ``SamplingParams``, or raises
``InvalidRequestError`` naming the field (a 400 for HTTP callers).

Checks, cheapest first: the shape of the call, the number of prompts and sequences (``limits.MAX_SEQUENCES``), a
text's length in characters against the context (before tokenizing, ``prompt_limits``), each prompt's sampling
parameters (types, ranges, counts and sizes, stop patterns, grammars parsed), then the token ids themselves and
``max_new_tokens`` against the context and the KV cache.
"""

from __future__ import annotations

from typing import Any

from radixlm.constrained import GrammarSpec, check_grammar
from radixlm.engine.io_struct import SchedulerInfo
from radixlm.engine.prompt_limits import check_context, check_prompt_chars, max_prompt_chars
from radixlm.errors import InvalidRequestError
from radixlm.sampling import SamplingParams
from radixlm.sampling.limits import MAX_SEQUENCES


class RequestValidator:
    def __init__(self, tokenizer: Any, info: SchedulerInfo, grammar_backend: str) -> None:
        """``tokenizer`` None: the engine runs with --skip-tokenizer-init (token ids only)."""
        self.tokenizer = tokenizer
        self.info = info
        self.grammar_backend = grammar_backend
        # Text prompts longer than this are refused before tokenizing (engine/prompt_limits.py).
        self.max_prompt_chars = None if tokenizer is None else max_prompt_chars(tokenizer, info.context_length)

    def require_tokenizer(self) -> Any:
        """The tokenizer; InvalidRequestError (a 400 for HTTP callers) when the engine runs without one."""
        if self.tokenizer is None:
            raise InvalidRequestError("this engine runs with --skip-tokenizer-init: send token ids (input_ids) and "
                                      "read output_ids")
        return self.tokenizer

    def prepare(self, prompt, sampling_params, input_ids, defaults: dict[str, Any] | None = None
                ) -> tuple[list[list[int]], list[SamplingParams], bool]:
        """Tokenize and validate (raises InvalidRequestError, ``param`` in this method's words): (token ids per
        prompt, parsed params per prompt, whether a single prompt was given).  A text prompt too long to fit the
        context is refused before it is tokenized.

        ``defaults``: sampling params that apply where a request sets none (e.g. OpenAI completions' 16 tokens).
        A ``max_new_tokens`` the request set itself must fit next to the prompt (else a 400); a default one is
        lowered to what fits (``prompt_limits.check_context``)."""
        if (prompt is None) == (input_ids is None):
            raise InvalidRequestError("pass exactly one of prompt and input_ids")
        source = "prompt" if prompt is not None else "input_ids"
        limit = self.info.context_length
        if prompt is not None:
            single = isinstance(prompt, str)
            prompts = [prompt] if single else list(prompt)
            if not all(isinstance(p, str) for p in prompts):
                raise InvalidRequestError("prompt must be a string or a list of strings", "prompt")
            if len(prompts) > MAX_SEQUENCES:  # before any tokenizing
                raise InvalidRequestError(f"at most {MAX_SEQUENCES} prompts per request, got {len(prompts)}", source)
            tokenizer = self.require_tokenizer()
            for p in prompts:
                check_prompt_chars(len(p), self.max_prompt_chars, limit, "prompt")
            ids = [tokenizer(p).input_ids for p in prompts]
        else:
            single = not input_ids or isinstance(input_ids[0], int)
            ids = [list(input_ids)] if single else [list(x) for x in input_ids]
        n = len(ids)
        if n == 0:
            raise InvalidRequestError("no prompts given", source)
        if n > MAX_SEQUENCES:
            raise InvalidRequestError(f"at most {MAX_SEQUENCES} prompts per request, got {n}", source)
        if isinstance(sampling_params, list):
            if len(sampling_params) != n:
                raise InvalidRequestError(f"{len(sampling_params)} sampling_params for {n} prompts", "sampling_params")
            raw = sampling_params
        else:
            raw = [sampling_params or {}] * n
        # A SamplingParams object always carries a max_new_tokens: taken as set by the caller.
        explicit = [not isinstance(r, dict) or r.get("max_new_tokens") is not None for r in raw]
        if defaults:
            raw = [{**r, **{k: v for k, v in defaults.items() if r.get(k) is None}} if isinstance(r, dict) else r
                   for r in raw]
        params = [self.parse_params(p) for p in raw]
        sequences = sum(p.n for p in params)
        if sequences > MAX_SEQUENCES:
            raise InvalidRequestError(f"at most {MAX_SEQUENCES} sequences (prompts x n) per request, got {sequences}",
                                      "n")
        vocab = self.info.vocab_size

        def is_token(t: Any) -> bool:
            return isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab

        for p_ids, p, given in zip(ids, params, explicit):
            if not p_ids:
                raise InvalidRequestError("the prompt is empty", source)
            bad = next((t for t in p_ids if not is_token(t)), None)
            if bad is not None:
                raise InvalidRequestError(f"input_ids must be token ids in [0, {vocab}), got {bad!r}", "input_ids")
            p.max_new_tokens = check_context(len(p_ids), p.max_new_tokens, given, limit, source)
            if len(p_ids) + 1 > self.info.max_total_num_tokens:
                raise InvalidRequestError(f"the prompt has {len(p_ids)} tokens; the KV cache holds "
                                          f"{self.info.max_total_num_tokens}", source)
        return ids, params, single

    def check_prompt_chars(self, chars: int, param: str) -> None:
        """InvalidRequestError when a text of ``chars`` characters cannot fit the context (before tokenizing)."""
        check_prompt_chars(chars, self.max_prompt_chars, self.info.context_length, param)

    def parse_params(self, raw: dict[str, Any] | SamplingParams) -> SamplingParams:
        """One prompt's sampling parameters, checked and normalized (a copy; ``raw`` is left as it is)."""
        if not isinstance(raw, (dict, SamplingParams)):
            raise InvalidRequestError(f"sampling_params must be an object, got {type(raw).__name__}",
                                      "sampling_params")
        p = raw if isinstance(raw, SamplingParams) else SamplingParams.from_dict(dict(raw))
        p = SamplingParams(**vars(p))
        p.verify(len(self.tokenizer) if self.tokenizer is not None else self.info.vocab_size)  # types first
        p.normalize()
        for name in ("stop", "stop_regex"):
            if getattr(p, name) and self.tokenizer is None:
                raise InvalidRequestError(f"{name} needs a tokenizer; this engine runs with --skip-tokenizer-init",
                                          name)
        spec = GrammarSpec.of(p)
        if spec is not None:
            if self.grammar_backend == "none":
                raise InvalidRequestError(f"{spec.kind} needs structured output, which is off "
                                          "(--grammar-backend none)", spec.kind)
            self.require_tokenizer()
            check_grammar(spec)
        return p


def check_streamable(params: list[SamplingParams]) -> None:
    """``stream=True`` streams one request: checked before anything is started."""
    if len(params) != 1 or params[0].n != 1:
        raise InvalidRequestError("stream=True takes a single prompt with n = 1", "stream")
