"""Unit tests for radixlm.engine.detokenizer: incremental detokenization, stop strings, RequestDecoder."""

from __future__ import annotations

import random
from typing import Any

import pytest

from radixlm.engine.detokenizer import IncrementalDetokenizer, RequestDecoder, StopStringMatcher

TEXTS = [
    "Hello, world! This is plain ASCII text with numbers 12345 and punctuation...",
    "Café naïve façade, Ærøskøbing, São Paulo, Zürich, crème brûlée, ½ °C",
    "机器学习是人工智能的一个分支。東京は日本の首都です。한국어 텍스트도 있습니다.",
    "Emoji: 🤖🚀 family 👨‍👩‍👧 flags 🇯🇵🇫🇷 rainbow 🏳️‍🌈 skin tone 👍🏽 done",
    "def f(x):\n    if x:\n        return x  # ok\n\n\tpass\n   \n",
    "Mixed: Привет мир, Ελληνικά, العربية, हिन्दी, ∑∫√∞ ≠ ≤ — “quotes” 🎉",
    "👨‍👩‍👧👨‍👩‍👧👨‍👩‍👧🇯🇵🇯🇵🇯🇵🏳️‍🌈🏳️‍🌈",  # back-to-back multi-token characters
    "  leading spaces and trailing spaces   ",
    "",
]
FAMILY = "👨‍👩‍👧"


def encode(tok: Any, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def chunked(ids: list[int], rng: random.Random, max_chunk: int = 5) -> list[list[int]]:
    chunks, i = [], 0
    while i < len(ids):
        n = rng.randint(1, max_chunk)
        chunks.append(ids[i:i + n])
        i += n
    return chunks


def stream(detok: IncrementalDetokenizer, chunks: list[list[int]]) -> list[str]:
    return [detok.add_tokens(c) for c in chunks] + [detok.flush()]


class CountingTokenizer:
    """Delegates to a real tokenizer, recording how many ids each ``decode`` call gets."""

    def __init__(self, tok: Any) -> None:
        self._tok = tok
        self.decoded: list[int] = []

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        self.decoded.append(len(ids))
        return self._tok.decode(ids, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)


# ----------------------------------------------------------------------------------------------------------------
# IncrementalDetokenizer


def test_a_character_really_spans_several_tokens(embedded_tokenizer):
    ids = encode(embedded_tokenizer, FAMILY)
    partial = [i for i in ids if embedded_tokenizer.decode([i]).endswith("\ufffd")]
    assert len(partial) >= 2
    # Fed one id at a time, the pieces of a character produce nothing until it completes.
    detok = IncrementalDetokenizer(embedded_tokenizer)
    deltas = [detok.add_tokens([i]) for i in ids]
    assert "" in deltas
    assert "".join(deltas) + detok.flush() == FAMILY


@pytest.mark.parametrize("text", TEXTS)
def test_one_token_at_a_time_matches_decode(embedded_tokenizer, text):
    ids = encode(embedded_tokenizer, text)
    detok = IncrementalDetokenizer(embedded_tokenizer)
    deltas = stream(detok, [[i] for i in ids])
    assert "".join(deltas) == embedded_tokenizer.decode(ids) == text
    assert detok.text == text
    assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("seed", range(5))
def test_random_chunks_match_decode(embedded_tokenizer, seed):
    rng = random.Random(seed)
    for text in TEXTS:
        ids = encode(embedded_tokenizer, text * 3)
        detok = IncrementalDetokenizer(embedded_tokenizer)
        deltas = stream(detok, chunked(ids, rng))
        assert "".join(deltas) == embedded_tokenizer.decode(ids)
        assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("seed", range(5))
def test_invalid_byte_soup_still_matches_decode(embedded_tokenizer, seed):
    """Mostly single-byte tokens in random order: lone continuation bytes, truncated sequences, some valid ones.
    U+FFFD may be emitted here, but only for bytes that are final, so the concatenation stays exact."""
    rng = random.Random(seed)
    byte_ids = range(17, 17 + 256)  # SmolLM2's 256 single-byte tokens
    ids = [rng.choice(byte_ids) if rng.random() < 0.8 else rng.randrange(17, 49152) for _ in range(400)]
    assert "\ufffd" in embedded_tokenizer.decode(ids)
    detok = IncrementalDetokenizer(embedded_tokenizer)
    assert "".join(stream(detok, chunked(ids, rng, max_chunk=3))) == embedded_tokenizer.decode(ids)


def test_flush_releases_truly_invalid_bytes(embedded_tokenizer):
    first = encode(embedded_tokenizer, "🤖")[0]
    assert embedded_tokenizer.decode([first]).endswith("\ufffd")
    detok = IncrementalDetokenizer(embedded_tokenizer)
    assert detok.add_tokens(encode(embedded_tokenizer, "ok ") + [first]) == "ok "
    assert detok.flush() == embedded_tokenizer.decode([first])
    assert detok.text == embedded_tokenizer.decode(encode(embedded_tokenizer, "ok ") + [first])
    with pytest.raises(RuntimeError):
        detok.add_tokens([first])


def test_empty_add_and_empty_output(embedded_tokenizer):
    detok = IncrementalDetokenizer(embedded_tokenizer)
    assert detok.add_tokens([]) == ""
    assert detok.flush() == "" and detok.text == ""


@pytest.mark.parametrize("skip, expected", [(True, "Hello world"), (False, "Hello<|im_end|> world<|endoftext|>")])
def test_skip_special_tokens(embedded_tokenizer, skip, expected):
    im_end = embedded_tokenizer.convert_tokens_to_ids("<|im_end|>")
    eot = embedded_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids = encode(embedded_tokenizer, "Hello") + [im_end] + encode(embedded_tokenizer, " world") + [eot]
    for spaces in (True, False):
        detok = IncrementalDetokenizer(embedded_tokenizer, skip_special_tokens=skip,
                                       spaces_between_special_tokens=spaces)
        assert "".join(stream(detok, [[i] for i in ids])) == expected


def test_long_run_of_skipped_special_tokens_mid_character(embedded_tokenizer):
    """Skipped special tokens carry no bytes; the window must keep the character's first bytes anyway."""
    im_end = embedded_tokenizer.convert_tokens_to_ids("<|im_end|>")
    head, *tail = encode(embedded_tokenizer, FAMILY)
    ids = encode(embedded_tokenizer, "a b c d e") + [head] + [im_end] * 20 + tail
    detok = IncrementalDetokenizer(embedded_tokenizer)
    deltas = stream(detok, [[i] for i in ids])
    assert "".join(deltas) == "a b c d e" + FAMILY
    assert not any("\ufffd" in d for d in deltas)


def test_prompt_ids_give_context_but_are_not_emitted(embedded_tokenizer):
    prompt = encode(embedded_tokenizer, "<|im_start|>user\nSay hi 👋<|im_end|>\n")
    output = encode(embedded_tokenizer, " Hi there 👋!")
    detok = IncrementalDetokenizer(embedded_tokenizer, prompt_ids=prompt)
    assert "".join(stream(detok, [[i] for i in output])) == " Hi there 👋!"


@pytest.mark.parametrize("kind", ["text", "specials"])
def test_decode_work_per_step_is_bounded(embedded_tokenizer, kind):
    if kind == "text":
        ids = encode(embedded_tokenizer, " ".join(TEXTS) * 20)[:2000]
    else:  # skipped special tokens carry no bytes, yet must not make the window grow either
        im_end = embedded_tokenizer.convert_tokens_to_ids("<|im_end|>")
        ids = (encode(embedded_tokenizer, "x y") + [im_end] * 998) * 2
    assert len(ids) == 2000
    counting = CountingTokenizer(embedded_tokenizer)
    detok = IncrementalDetokenizer(counting)
    worst, deltas = 0, []
    for i in ids:
        counting.decoded.clear()
        deltas.append(detok.add_tokens([i]))
        worst = max(worst, sum(counting.decoded))
    assert worst <= 16
    assert "".join(deltas) + detok.flush() == embedded_tokenizer.decode(ids, skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------------------------
# StopStringMatcher


def feed_all(matcher: StopStringMatcher, pieces: list[str]) -> list[tuple[str, str | None]]:
    return [matcher.feed(p) for p in pieces]


def test_stop_split_across_deltas_is_trimmed():
    m = StopStringMatcher(["STOP"])
    assert feed_all(m, ["abc ST", "O", "P tail", "more"]) == [("abc ", None), ("", None), ("", "STOP"), ("", None)]
    assert m.matched == "STOP" and m.flush() == ""


def test_stop_kept_with_no_stop_trim():
    m = StopStringMatcher(["STOP"], no_stop_trim=True)
    assert feed_all(m, ["abc ST", "O", "P tail"]) == [("abc ", None), ("", None), ("STOP", "STOP")]


def test_held_back_prefix_that_is_no_stop_is_released_in_order():
    m = StopStringMatcher(["STOP"])
    assert feed_all(m, ["abc ST", "OX", "S", "T"]) == [("abc ", None), ("STOX", None), ("", None), ("", None)]
    assert m.flush() == "ST" and m.matched is None


def test_stop_inside_first_delta():
    m = StopStringMatcher(["STOP"])
    assert m.feed("foo STOP bar STOP") == ("foo ", "STOP")


def test_earliest_start_wins():
    m = StopStringMatcher(["world", "lo w"])
    assert m.feed("hello world") == ("hel", "lo w")
    # "bc" completes first, but "abcd" starts earlier, so the matcher waits for it.
    m = StopStringMatcher(["bc", "abcd"])
    assert feed_all(m, ["xab", "c", "d"]) == [("x", None), ("", None), ("", "abcd")]
    m = StopStringMatcher(["bc", "abcd"])
    assert feed_all(m, ["xab", "c", "!"]) == [("x", None), ("", None), ("a", "bc")]


def test_equal_starts_longer_wins_and_flush_resolves_a_waiting_match():
    m = StopStringMatcher(["ab", "abc"])
    assert feed_all(m, ["xa", "b", "c"]) == [("x", None), ("", None), ("", "abc")]
    m = StopStringMatcher(["ab", "abc"])
    assert feed_all(m, ["xab", "x"]) == [("x", None), ("", "ab")]
    m = StopStringMatcher(["ab", "abc"], no_stop_trim=True)
    assert m.feed("xab") == ("x", None)
    assert m.flush() == "ab" and m.matched == "ab"


def test_no_stops_and_empty_stops_pass_text_through():
    for stops in ([], [""]):
        m = StopStringMatcher(stops)
        assert m.feed("anything") == ("anything", None)
        assert m.flush() == ""


@pytest.mark.parametrize("seed", range(20))
def test_result_does_not_depend_on_how_text_is_split(seed):
    rng = random.Random(seed)
    stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
    text = "".join(rng.choice("abc") for _ in range(30))
    whole = StopStringMatcher(stops)
    expected = whole.feed(text)[0] + whole.flush()
    m, out, i = StopStringMatcher(stops), [], 0
    while i < len(text):
        n = rng.randint(1, 4)
        out.append(m.feed(text[i:i + n])[0])
        i += n
        if m.matched is None:  # held back: less than the longest stop string
            assert i - len("".join(out)) <= max(map(len, stops)) - 1
    assert "".join(out) + m.flush() == expected
    assert m.matched == whole.matched
    if whole.matched is not None:
        assert text.startswith(expected + whole.matched)


# ----------------------------------------------------------------------------------------------------------------
# Stop strings on real tokens, and RequestDecoder end to end


def run_decoder(dec: RequestDecoder, ids: list[int], chunk: int = 1) -> tuple[list[str], str | None]:
    deltas, matched = [], None
    for i in range(0, len(ids), chunk):
        delta, m = dec.step(ids[i:i + chunk])
        deltas.append(delta)
        matched = matched or m
    if matched is None:
        deltas.append(dec.finish())
    return deltas, matched


def test_stop_string_spanning_three_tokens(embedded_tokenizer):
    text = "The answer is 42. Done here."
    ids = encode(embedded_tokenizer, text)
    stop = " 42."
    assert not any(stop in embedded_tokenizer.decode([i]) for i in ids)
    assert not any(stop in embedded_tokenizer.decode(ids[k:k + 2]) for k in range(len(ids)))
    for no_trim, expected in ((False, "The answer is"), (True, "The answer is 42.")):
        dec = RequestDecoder(embedded_tokenizer, [stop], no_stop_trim=no_trim)
        deltas, matched = run_decoder(dec, ids)
        assert matched == stop and dec.matched == stop
        assert "".join(deltas) == dec.text == expected
        assert dec.step(encode(embedded_tokenizer, " after")) == ("", None) and dec.finish() == ""


def test_stop_string_equal_to_a_whole_token(embedded_tokenizer):
    ids = encode(embedded_tokenizer, "The capital of France is Paris. It is")
    assert embedded_tokenizer.decode([ids[5]]) == " Paris"
    dec = RequestDecoder(embedded_tokenizer, [" Paris"])
    steps = [dec.step([i]) for i in ids[:6]]
    assert steps[-1] == ("", " Paris")
    assert "".join(d for d, _ in steps) == dec.text == "The capital of France is"


def test_stop_string_inside_a_multi_token_character(embedded_tokenizer):
    ids = encode(embedded_tokenizer, f"family {FAMILY} and more")
    dec = RequestDecoder(embedded_tokenizer, ["👩"])
    deltas, matched = run_decoder(dec, ids)
    assert matched == "👩"
    assert "".join(deltas) == "family 👨\u200d"
    assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_request_decoder_end_to_end(embedded_tokenizer, chunk):
    im_end = embedded_tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = encode(embedded_tokenizer, TEXTS[3] + " " + TEXTS[4]) + [im_end]
    dec = RequestDecoder(embedded_tokenizer, [], True, True, False)
    deltas, matched = run_decoder(dec, ids, chunk)
    assert matched is None and "".join(deltas) == dec.text == TEXTS[3] + " " + TEXTS[4]

    dec = RequestDecoder(embedded_tokenizer, ["return", "🏳️‍🌈"], skip_special_tokens=False)
    deltas, matched = run_decoder(dec, ids, chunk)
    assert matched == "🏳️‍🌈"
    assert "".join(deltas) == dec.text == TEXTS[3][:TEXTS[3].index("🏳️‍🌈")]

    # Without a match the held-back tail of a possible stop string comes out at finish.
    dec = RequestDecoder(embedded_tokenizer, ["pass\n   X"], skip_special_tokens=False)
    deltas, matched = run_decoder(dec, ids, chunk)
    assert matched is None
    assert "".join(deltas) == dec.text == embedded_tokenizer.decode(ids, skip_special_tokens=False)


# ---------------------------------------------------------------------------------------------- stop_regex
ANSWER = "The answer is 42. Done here."


@pytest.mark.parametrize("chunk", [1, 3, 100])
@pytest.mark.parametrize(("patterns", "stop", "no_trim", "text", "matched"), [
    # the match stays in the output (SGLang), whatever no_stop_trim says; text after it is cut
    ([r"\d+\."], [], False, "The answer is 42.", r"\d+\."),
    ([r"\d+\."], [], True, "The answer is 42.", r"\d+\."),
    ([r"^The"], [], False, "The", r"^The"),
    ([r"^answer", r"Done"], [], False, "The answer is 42. Done", "Done"),  # `^` only at the output's start
    ([r"Done", r"is"], [], False, "The answer is", "is"),  # the match that ends first wins
    ([r"(?<=is )4"], [], False, "The answer is 4", r"(?<=is )4"),
    ([r"here"], [" 42"], False, "The answer is", " 42"),  # a stop string completed first wins, trimmed
    ([r"\d"], ["Done"], False, "The answer is 4", r"\d"),
    ([r"nowhere"], [], False, ANSWER, None),
])
def test_stop_regex(embedded_tokenizer, chunk, patterns, stop, no_trim, text, matched):
    ids = encode(embedded_tokenizer, ANSWER)
    dec = RequestDecoder(embedded_tokenizer, stop, no_stop_trim=no_trim, stop_regex=patterns)
    deltas, got = run_decoder(dec, ids, chunk)
    assert "".join(deltas) == dec.text == text
    assert got == dec.matched == matched
    if matched is not None:
        assert dec.step(encode(embedded_tokenizer, " 7.")) == ("", None) and dec.finish() == ""


def test_stop_regex_dollar_is_the_end_of_each_step(embedded_tokenizer):
    """`$` matches the end of the text generated so far, so whether it is seen depends on where steps end."""
    ids = encode(embedded_tokenizer, ANSWER)
    dec = RequestDecoder(embedded_tokenizer, stop_regex=[r"\.$"])
    deltas, matched = run_decoder(dec, ids, 1)
    assert "".join(deltas) == "The answer is 42." and matched == r"\.$"
    dec = RequestDecoder(embedded_tokenizer, stop_regex=[r"\.$"])
    assert dec.step(ids) == (ANSWER, r"\.$")  # one step: only the final "." is at the end


def test_stop_regex_and_a_stop_string_in_the_same_step(embedded_tokenizer):
    """Both complete in one delta: the stop string ends before the regex match does, so it wins (trimmed)."""
    dec = RequestDecoder(embedded_tokenizer, ["answer"], stop_regex=[r"is \d+"])
    assert dec.step(encode(embedded_tokenizer, ANSWER)) == ("The ", "answer")


def test_stop_regex_state_stays_bounded(embedded_tokenizer):
    """However long the output, the matcher keeps only its alive NFA states and a lookbehind's few characters."""
    ids = encode(embedded_tokenizer, "word " * 2000)
    dec = RequestDecoder(embedded_tokenizer, stop_regex=[r"\d+x", r"(?<=ab)c"])
    run_decoder(dec, ids, 1)
    assert dec.matched is None
    assert len(dec._regex._history) == 3 and len(dec._regex._threads) <= len(dec._regex._regexes.prog)


def test_stop_regex_match_completed_across_deltas(embedded_tokenizer):
    """A match whose characters arrive in several steps is found in the step that completes it."""
    dec = RequestDecoder(embedded_tokenizer, stop_regex=[r"a\d{3}b"])
    assert dec.step(encode(embedded_tokenizer, "x a1")) == ("x a1", None)
    assert dec.step(encode(embedded_tokenizer, "23")) == ("23", None)
    assert dec.step(encode(embedded_tokenizer, "b tail")) == ("b", r"a\d{3}b")
