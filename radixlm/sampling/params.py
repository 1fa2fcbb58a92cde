"""Per-request sampling parameters (SGLang field names and defaults)."""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
from dataclasses import dataclass
from typing import Any, Callable, get_args, get_origin, get_type_hints

from radixlm.errors import InvalidRequestError
from radixlm.sampling import limits
from radixlm.sampling.stop_regex import compile_stop_regexes

# Below this temperature a request is treated as greedy; dividing logits by it would overflow.
_GREEDY_TEMPERATURE_EPS = 1e-6
_PENALTY_RANGE = (-2.0, 2.0)
_LOGIT_BIAS_RANGE = (-100.0, 100.0)


def parse_token_id(key: int | str) -> int:
    """Turn a logit_bias key (an int, or a decimal string as OpenAI clients send) into a token id.

    Raises InvalidRequestError for anything else, bools included (they are ints to Python but
    never meant as token ids).
    """
    if isinstance(key, bool):
        raise InvalidRequestError(f"logit_bias key {key!r} is not a token id", "logit_bias")
    if isinstance(key, int):
        return key
    if isinstance(key, str):
        try:
            return int(key)
        except ValueError:
            pass
    raise InvalidRequestError(f"logit_bias key {key!r} is not a token id (int or decimal string)", "logit_bias")


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_integer(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


# annotation -> (check, name, plural name), for the types SamplingParams' fields are made of
_SCALARS: dict[Any, tuple[Callable[[object], bool], str, str]] = {
    int: (_is_integer, "an integer", "integers"),
    float: (_is_real, "a number", "numbers"),
    bool: (lambda x: isinstance(x, bool), "a boolean", "booleans"),
    str: (lambda x: isinstance(x, str), "a string", "strings"),
    type(None): (lambda x: x is None, "null", "nulls"),
}


def _has_type(value: object, hint: Any) -> bool:
    """Whether ``value`` fits a field annotation (scalars, lists of scalars, dicts, unions of those); dict
    entries are left to the field's own checks."""
    args = get_args(hint)
    if isinstance(hint, types.UnionType):
        return any(_has_type(value, h) for h in args)
    if get_origin(hint) is list:
        return isinstance(value, list) and all(_has_type(v, args[0]) for v in value)
    if get_origin(hint) is dict:
        return isinstance(value, dict)
    return _SCALARS[hint][0](value)


def _type_name(hint: Any) -> str:
    args = get_args(hint)
    if isinstance(hint, types.UnionType):
        return " or ".join(_type_name(h) for h in args)
    if get_origin(hint) is list:
        return f"a list of {_SCALARS[args[0]][2]}"
    if get_origin(hint) is dict:
        return "an object"
    return _SCALARS[hint][1]


@dataclass
class SamplingParams:
    """Sampling parameters of one request.

    Contract: call `normalize()` once before building a batch from it; `verify()` may be
    called before or after `normalize()` and raises InvalidRequestError (param: the field) on the
    first invalid field.
    """

    max_new_tokens: int | None = 128
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stop_regex: str | list[str] | None = None  # the output stops once its text matches one (SGLang)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 = whole vocabulary
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = 1
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    structural_tag: str | None = None  # an XGrammar structural tag (JSON text), e.g. for tool calls
    logit_bias: dict[str, float] | None = None  # token id (str or int key) -> additive bias
    seed: int | None = None
    stream_interval: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingParams:
        """Build from a request dict; unknown keys raise InvalidRequestError (typos must not be ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InvalidRequestError(f"unknown sampling parameter(s): {', '.join(unknown)}", unknown[0])
        return cls(**d)

    def normalize(self) -> None:
        """Canonicalize in place: list-valued `stop`/`stop_regex`/`stop_token_ids`, greedy as top_k == 1.

        A (near-)zero temperature becomes `temperature = 1.0, top_k = 1` so that the sampler
        never divides by ~0. Negative temperatures are left alone for `verify()` to reject.
        """
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop_regex is None:
            self.stop_regex = []
        elif isinstance(self.stop_regex, str):
            self.stop_regex = [self.stop_regex]
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if 0.0 <= self.temperature < _GREEDY_TEMPERATURE_EPS:
            self.temperature = 1.0
            self.top_k = 1

    def verify(self, vocab_size: int | None = None) -> None:
        """Raise InvalidRequestError naming the offending field (its ``param``) and what it allows.

        Every field must have its declared type (an int is a float, a bool is not a number), and list-valued
        fields stay within ``radixlm.sampling.limits``.  logit_bias keys are range-checked only when `vocab_size`
        is given; stop_token_ids only for being ids (>= 0): like SGLang, ids beyond the vocabulary are accepted
        and can never match.
        """
        self._verify_types()
        if not self.temperature >= 0.0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        if self.top_k < 1 and self.top_k != -1:
            raise InvalidRequestError(f"top_k must be -1 (disabled) or >= 1, got {self.top_k}", "top_k")
        lo, hi = _PENALTY_RANGE
        for name in ("frequency_penalty", "presence_penalty"):
            if not lo <= getattr(self, name) <= hi:
                raise InvalidRequestError(f"{name} must be in [{lo}, {hi}], got {getattr(self, name)}", name)
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise InvalidRequestError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}",
                                      "repetition_penalty")
        if self.max_new_tokens is not None and self.max_new_tokens < 0:
            raise InvalidRequestError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}", "max_new_tokens")
        if self.min_new_tokens < 0:
            raise InvalidRequestError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}", "min_new_tokens")
        if self.max_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            raise InvalidRequestError(
                f"min_new_tokens must be <= max_new_tokens ({self.max_new_tokens}), "
                f"got {self.min_new_tokens}", "min_new_tokens"
            )
        if not 1 <= self.n <= limits.MAX_N:
            raise InvalidRequestError(f"n must be in [1, {limits.MAX_N}], got {self.n}", "n")
        constraints = [
            name for name in ("json_schema", "regex", "ebnf", "structural_tag") if getattr(self, name) is not None
        ]
        if len(constraints) > 1:
            raise InvalidRequestError(
                f"at most one of json_schema, regex, ebnf, structural_tag may be set, got {', '.join(constraints)}",
                constraints[1],
            )
        self._verify_sizes()
        self._verify_logit_bias(vocab_size)
        self._verify_stop_token_ids()
        if self.stop_regex:
            compile_stop_regexes(_as_list(self.stop_regex))

    def _verify_sizes(self) -> None:
        stops = _as_list(self.stop)
        _check_count("stop", len(stops), limits.MAX_STOP_STRINGS, "stop strings")
        longest = max(stops, key=len, default="")
        if len(longest) > limits.MAX_STOP_STRING_CHARS:
            raise InvalidRequestError(f"stop strings may be at most {limits.MAX_STOP_STRING_CHARS} characters, got "
                                      f"one of {len(longest)}", "stop")
        _check_count("stop_regex", len(_as_list(self.stop_regex)), limits.MAX_STOP_REGEXES, "patterns")
        _check_count("stop_token_ids", len(self.stop_token_ids or ()), limits.MAX_STOP_TOKEN_IDS, "ids")
        _check_count("logit_bias", len(self.logit_bias or ()), limits.MAX_LOGIT_BIAS, "entries")
        for name in ("json_schema", "regex", "ebnf", "structural_tag"):
            text = getattr(self, name)
            if text is not None and len(text) > limits.MAX_GRAMMAR_CHARS:
                raise InvalidRequestError(f"{name} may be at most {limits.MAX_GRAMMAR_CHARS} characters, got "
                                          f"{len(text)}", name)

    def _verify_types(self) -> None:
        for name, hint in get_type_hints(SamplingParams).items():
            value = getattr(self, name)
            if not _has_type(value, hint):
                raise InvalidRequestError(f"{name} must be {_type_name(hint)}, got {value!r}", name)
            # NaN and Infinity (JSON tokens some parsers accept) pass the range checks below as NaN logits would
            if isinstance(value, float) and not math.isfinite(value):
                raise InvalidRequestError(f"{name} must be a finite number, got {value}", name)

    def _verify_logit_bias(self, vocab_size: int | None) -> None:
        if self.logit_bias is None:
            return
        lo, hi = _LOGIT_BIAS_RANGE
        for key, bias in self.logit_bias.items():
            token_id = parse_token_id(key)
            if token_id < 0 or (vocab_size is not None and token_id >= vocab_size):
                bound = "" if vocab_size is None else f", {vocab_size}"
                raise InvalidRequestError(f"logit_bias key {key!r} must be a token id in [0{bound}), got {token_id}",
                                          "logit_bias")
            if not (_is_real(bias) and lo <= bias <= hi):
                raise InvalidRequestError(f"logit_bias value for {key!r} must be in [{lo}, {hi}], got {bias!r}",
                                          "logit_bias")

    def _verify_stop_token_ids(self) -> None:
        for token_id in self.stop_token_ids or []:
            is_id = isinstance(token_id, int) and not isinstance(token_id, bool)
            if not is_id or token_id < 0:
                raise InvalidRequestError(f"stop_token_ids entries must be token ids (integers >= 0), got "
                                          f"{token_id!r}", "stop_token_ids")


def _as_list(value: str | list[str] | None) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else value


def _check_count(name: str, count: int, limit: int, what: str) -> None:
    if count > limit:
        raise InvalidRequestError(f"{name} takes at most {limit} {what}, got {count}", name)
