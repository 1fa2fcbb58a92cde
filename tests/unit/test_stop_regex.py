"""``stop_regex``'s streaming NFA against Python's ``re`` as the brute-force reference.

The reference for "where does the output stop": the shortest prefix of the text that ``re.search`` finds a match
in (for patterns without assertions about the text ahead, that is exactly the earliest match end), whatever the
split of the text into steps.
"""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from radixlm.errors import InvalidRequestError
from radixlm.sampling.limits import MAX_STOP_REGEX_PROGRAM
from radixlm.sampling.stop_regex import StopRegexMatcher, compile_stop_regexes


def earliest_end(patterns: list[str], text: str) -> tuple[int, str] | None:
    for end in range(1, len(text) + 1):
        for p in patterns:
            if re.search(p, text[:end]) is not None:
                return end, p
    return None


def run(patterns: list[str], pieces: list[str]) -> tuple[str, str | None]:
    matcher = StopRegexMatcher(patterns)
    out = []
    for piece in pieces:
        text, matched = matcher.feed(piece)
        out.append(text)
        if matched is not None:
            return "".join(out), matched
    return "".join(out), None


def split(text: str, cuts: list[int]) -> list[str]:
    cuts = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in zip(cuts, cuts[1:])]


# Regexes over a small alphabet, so that matches are frequent: every construct the matcher supports except the
# assertions about the end of the text.
_atoms = st.sampled_from(["a", "b", "c", ".", "[ab]", "[^a]", r"\d", r"\w", r"\s", "(?<=a)b", "(?<!b)a", "(?i:A)"])


def _combine(children):
    return st.one_of(
        st.tuples(children, children).map(lambda t: t[0] + t[1]),
        st.tuples(children, children).map(lambda t: f"(?:{t[0]}|{t[1]})"),
        st.tuples(children, st.sampled_from(["*", "+", "?", "{2}", "{1,3}", "*?", "+?", "{0,2}"])).map(
            lambda t: f"(?:{t[0]}){t[1]}"),
    )


patterns = st.recursive(_atoms, _combine, max_leaves=6).filter(
    lambda p: re.compile(p) is not None and re.search(p, "") is None and _min_width(p) > 0)


def _min_width(p: str) -> int:
    import re._parser as sre_parse

    return sre_parse.parse(p).getwidth()[0]


texts = st.text(alphabet="abc1 A\n", max_size=24)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(st.lists(patterns, min_size=1, max_size=3), texts, st.lists(st.integers(0, 30), max_size=5))
def test_stops_where_re_first_finds_a_match_whatever_the_steps(pats, text, cuts):
    expected = earliest_end(pats, text)
    got_text, got_pattern = run(pats, split(text, cuts))
    if expected is None:
        assert (got_text, got_pattern) == (text, None)
    else:
        end, pattern = expected
        assert (got_text, got_pattern) == (text[:end], pattern)


@pytest.mark.parametrize(("pattern", "pieces", "text", "matched"), [
    (r"\d+\.", ["The answer is 4", "2. Done"], "The answer is 42.", r"\d+\."),
    (r"^The", ["The end"], "The", r"^The"),
    (r"^end", ["The end"], "The end", None),  # `^` is the start of the output only
    (r"(?m)^end", ["The\nend"], "The\nend", r"(?m)^end"),
    (r"\.$", ["a.", "b"], "a.", r"\.$"),  # `$`: the end of the text so far
    (r"\.$", ["a.b"], "a.b", None),
    (r"(?m)\.$", ["a.\nb"], "a.", r"(?m)\.$"),
    (r"cat\b", ["cats cat "], "cats cat", r"cat\b"),
    (r"\bcat", ["concat cat"], "concat cat", r"\bcat"),
    (r"(?i)done", ["All DONE now"], "All DONE", r"(?i)done"),
    (r"a.c", ["a\nc abc"], "a\nc abc", r"a.c"),  # `.` is not a newline
    (r"(?s)a.c", ["a\nc"], "a\nc", r"(?s)a.c"),
    ("é+", ["cafés"], "café", "é+"),
])
def test_examples(pattern, pieces, text, matched):
    assert run([pattern], pieces) == (text, matched)


def test_first_pattern_wins_a_tie():
    assert run(["b", "ab"], ["xab"]) == ("xab", "b")
    assert run(["ab", "b"], ["xab"]) == ("xab", "ab")


def test_backtracking_bombs_run_in_linear_time():
    """Patterns that take ``re`` exponential time are one pass here."""
    text = "a" * 5000
    start = time.perf_counter()
    for pattern in ["(a|a)*b", "(a|aa)+c", "(.*a){12}x", "(a+)+b"]:
        assert run([pattern], [text[i:i + 7] for i in range(0, len(text), 7)]) == (text, None)
    assert time.perf_counter() - start < 60  # a hang detector, not a benchmark: `re` would never return


@pytest.mark.parametrize(("pattern", "why"), [
    ("a(?=b)", "lookahead"),
    ("a(?!b)", "lookahead"),
    (r"(a)\1", "backreferences"),
    ("(a)?(?(1)b|c)", "conditional"),
    ("(?>ab)", "atomic"),
    ("a++", "possessive"),
    ("a*", "empty string"),
    (r"\b", "empty string"),
    ("(unclosed", "invalid"),
    ("x{1,2000}", "instructions"),
])
def test_refused(pattern, why):
    with pytest.raises(InvalidRequestError, match=why) as info:
        compile_stop_regexes([pattern])
    assert info.value.param == "stop_regex"


def test_the_patterns_of_a_request_share_one_program_bound():
    one = len(compile_stop_regexes(["x{1,600}"]).prog)
    assert one < MAX_STOP_REGEX_PROGRAM
    with pytest.raises(InvalidRequestError, match="instructions"):
        compile_stop_regexes(["x{1,600}"] * (MAX_STOP_REGEX_PROGRAM // one + 1))
