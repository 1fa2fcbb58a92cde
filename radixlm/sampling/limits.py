"""Per-request limits, checked in the front end before any work is done (a 400 naming the field beyond them).

One place for the numbers, so that the OpenAI routes (pydantic), the native ``/generate`` and the offline engine
(``SamplingParams.verify``) refuse the same requests.  Each bound is far above what a real client sends and low
enough that the per-token work it multiplies stays small:

- ``MAX_N``: copies of one prompt (OpenAI's own bound for ``n``); each copy is a full request.
- ``MAX_SEQUENCES``: sequences one call may start (prompts of a batch x their ``n``): each costs front-end work
  and a scheduler entry, and a call's submission is one unit, so it is bounded like a batch a client would send.
- ``MAX_STOP_STRINGS`` / ``MAX_STOP_STRING_CHARS``: OpenAI allows 4 stop strings; we allow more.  The stop matcher
  costs O(count x length) per token, so both are bounded.
- ``MAX_STOP_REGEXES`` / ``MAX_STOP_REGEX_CHARS`` / ``MAX_STOP_REGEX_PROGRAM``: the same for ``stop_regex``; the
  patterns run as one NFA whose size (instructions, bounded repeats unrolled) bounds the work per output character.
- ``MAX_STOP_TOKEN_IDS``: checked against every output token.
- ``MAX_LOGIT_BIAS``: entries become a dense bias row per request.
- ``MAX_GRAMMAR_CHARS``: a json_schema / regex / ebnf / structural tag is parsed in the front end and compiled
  against the whole vocabulary in the scheduler; 256 KiB fits a tool list of dozens of large schemas.
"""

from __future__ import annotations

MAX_N = 128
MAX_SEQUENCES = 4096
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_REGEXES = 8
MAX_STOP_REGEX_CHARS = 256
MAX_STOP_REGEX_PROGRAM = 2048
MAX_STOP_TOKEN_IDS = 256
MAX_LOGIT_BIAS = 1024
MAX_GRAMMAR_CHARS = 256 * 1024
