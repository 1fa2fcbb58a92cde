"""Whether a prompt fits the context: a character bound checked before tokenizing, then the exact token count.

Tokenizing is the front end's most expensive step for a huge string (seconds of CPU for megabytes), so a text
prompt too long to possibly fit is refused by its length in characters alone.  The bound never refuses a prompt
that would fit: for a tokenizer without a normalizer, every token covers at most as many characters of the text as
its vocabulary string has (byte-level BPE: one string character per byte, and a character cut between tokens is
counted in each), so ``n`` tokens cover at most ``n * longest`` characters and a text of more than
``context_length * longest`` characters needs more than ``context_length`` tokens.  Normalizers may compose
characters (NFC turns "e" + U+0301 into one), so with one the bound is ``_NORMALIZER_SLACK`` times larger; a
normalizer that deletes characters (accent stripping; no generative model's tokenizer has one) is not covered.

A prompt that passes is tokenized and its exact length checked (``check_context``): at most ``context_length - 1``
prompt tokens (one must be generated), and a ``max_new_tokens`` the client set that does not fit next to the
prompt is a 400 in the wording clients already parse (vLLM's); one it did not set (a default) is lowered to fit.
"""

from __future__ import annotations

from typing import Any

from radixlm.errors import InvalidRequestError

_NORMALIZER_SLACK = 4


def max_prompt_chars(tokenizer: Any, context_length: int) -> int:
    """Characters beyond which no text tokenizes to fewer than ``context_length`` tokens (see the module doc)."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    longest = max((len(t) for t in tokens if t), default=1)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    exact = backend is not None and backend.normalizer is None
    return context_length * longest * (1 if exact else _NORMALIZER_SLACK)


def check_prompt_chars(chars: int, bound: int | None, context_length: int, param: str) -> None:
    if bound is not None and chars > bound:
        raise InvalidRequestError(f"the prompt has {chars} characters: more than fit in the context length of "
                                  f"{context_length} tokens with this tokenizer (at most {bound} characters)", param)


def check_context(prompt_tokens: int, max_new_tokens: int | None, explicit: bool, context_length: int,
                  param: str) -> int | None:
    """The ``max_new_tokens`` to run with: as given when prompt + it fit the context, lowered to fit when the
    client did not set it (``explicit`` False), else InvalidRequestError (``param`` the prompt's field when the
    prompt alone is too long, ``max_new_tokens`` otherwise)."""
    if prompt_tokens >= context_length:
        raise InvalidRequestError(f"the prompt has {prompt_tokens} tokens; the context length is {context_length} "
                                  "(at most one less, so that one token can be generated)", param)
    room = context_length - prompt_tokens
    if max_new_tokens is None or max_new_tokens <= room:
        return max_new_tokens
    if not explicit:
        return room
    raise InvalidRequestError(
        f"This model's maximum context length is {context_length} tokens. However, you requested "
        f"{prompt_tokens + max_new_tokens} tokens ({prompt_tokens} in the messages, {max_new_tokens} in the "
        f"completion). Please reduce the length of the messages or the completion (at most {room} new tokens fit).",
        "max_new_tokens")
