"""``stop_regex`` patterns (SGLang's sampling parameter): checked once at submission, searched on every step.

Python's ``re`` backtracks and cannot be interrupted, and the search runs on the front end's receiver thread that
delivers every request's tokens, so a pattern is admitted only when its per-step cost is bounded:

- it compiles, is at most ``MAX_STOP_REGEX_CHARS`` long, and cannot match the empty string (it would stop before
  any output);
- it has no variable repeat nested inside a repeat (``(a+)+``, ``(.{0,60}){0,60}``, ``(\\d+,)*``; fixed counts
  such as ``(\\d{3},)*`` are fine): the classic exponential-backtracking shape.  (Ambiguous alternations under one repeat, ``(a|a)*b``, are not detected; the
  search window below bounds how much text they see.)
- the text searched each step is a bounded window: a match can be at most ``max_width`` characters long (the
  pattern's own maximum width, or ``STOP_REGEX_WINDOW_CHARS`` for unbounded ones such as ``\\d+\\.``: longer
  matches of those are not found).
"""

from __future__ import annotations

import re
import re._parser as sre_parse  # the stdlib's own regex parser: widths and repeats of a pattern
from dataclasses import dataclass

from radixlm.errors import InvalidRequestError
from radixlm.sampling.limits import MAX_STOP_REGEX_CHARS

STOP_REGEX_WINDOW_CHARS = 1024
_REPEATS = {sre_parse.MAX_REPEAT, sre_parse.MIN_REPEAT, sre_parse.POSSESSIVE_REPEAT}


@dataclass(frozen=True)
class StopRegex:
    pattern: str  # as the client sent it: what ``matched_stop`` reports
    compiled: re.Pattern[str]
    max_width: int  # no match is longer than this many characters (the search window)


def compile_stop_regex(pattern: str) -> StopRegex:
    """The checked, compiled pattern; InvalidRequestError (param ``stop_regex``) saying why it is refused."""
    if len(pattern) > MAX_STOP_REGEX_CHARS:
        raise InvalidRequestError(f"stop_regex patterns may be at most {MAX_STOP_REGEX_CHARS} characters, got "
                                  f"{len(pattern)}", "stop_regex")
    try:
        compiled = re.compile(pattern)
        tree = sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise InvalidRequestError(f"invalid stop_regex {pattern!r}: {e}", "stop_regex") from e
    lo, hi = tree.getwidth()
    if lo == 0 and compiled.search("") is not None:
        raise InvalidRequestError(f"stop_regex {pattern!r} matches the empty string", "stop_regex")
    if _has_nested_repeat(tree.data, inside_repeat=False):
        raise InvalidRequestError(f"stop_regex {pattern!r} nests a repeat inside a repeat, which can take "
                                  "exponential time to search; flatten it", "stop_regex")
    return StopRegex(pattern, compiled, min(hi, STOP_REGEX_WINDOW_CHARS))


def _has_nested_repeat(items: list, inside_repeat: bool) -> bool:
    for op, arg in items:
        if op in _REPEATS:
            lo, hi, sub = arg
            if inside_repeat and hi > 1 and lo != hi:  # a variable repeat under a repeat: ambiguous splits
                return True
            if _has_nested_repeat(sub.data, inside_repeat or hi > 1):
                return True
        elif op is sre_parse.SUBPATTERN:
            if _has_nested_repeat(arg[-1].data, inside_repeat):
                return True
        elif op is sre_parse.BRANCH:
            if any(_has_nested_repeat(branch.data, inside_repeat) for branch in arg[1]):
                return True
        elif op in (sre_parse.ASSERT, sre_parse.ASSERT_NOT):
            if _has_nested_repeat(arg[1].data, inside_repeat):
                return True
        elif op is sre_parse.ATOMIC_GROUP:
            if _has_nested_repeat(arg.data, inside_repeat):
                return True
        elif op is sre_parse.GROUPREF_EXISTS:
            if any(b is not None and _has_nested_repeat(b.data, inside_repeat) for b in arg[1:]):
                return True
    return False
