"""Streaming detokenization and stop-string matching for one request.

``IncrementalDetokenizer`` turns output token ids into text as they arrive, never emitting half a UTF-8 character;
``StopStringMatcher`` finds stop strings in that text even when they straddle deltas; ``StopRegexMatcher``
(``radixlm.sampling.stop_regex``) finds ``stop_regex`` matches in it; ``RequestDecoder`` chains them the way the
engine uses them.

Detokenization keeps a small *window* of the most recent ids and decodes only that window on each step (the offset
technique of SGLang/vLLM): the window text's first ``_emitted`` characters have already been emitted (or belong to
the prompt context), and whatever lies beyond them is emitted now — except a trailing U+FFFD.  A UTF-8 sequence cut
off by the end of the byte stream decodes to exactly one trailing U+FFFD and everything before it is already final,
so holding back that single character is both necessary and sufficient.  The window is trimmed from the left once
it grows past ``_MAX_WINDOW`` ids, which keeps every step O(window + new ids) however long the output gets.
"""

from __future__ import annotations

from typing import Any

from radixlm.sampling.stop_regex import StopRegexMatcher

_REPLACEMENT = "\ufffd"
# Trim the window once it holds more than this many ids ...
_MAX_WINDOW = 8
# ... down to the last this-many byte-carrying ids.  A UTF-8 sequence still open at the end of the stream holds at
# most 3 bytes and every byte-carrying token contributes at least one byte, so 4 such tokens always contain the
# whole open sequence plus at least one earlier token of left context (merges, leading-space handling).
_KEEP_TOKENS = 4


class IncrementalDetokenizer:
    """Streams the text of one request's output ids.

    Contract, for byte-level BPE tokenizers: after ``flush()``, the concatenation of everything returned by
    ``add_tokens`` and ``flush`` equals ``tokenizer.decode(output_ids, skip_special_tokens=...,
    clean_up_tokenization_spaces=False)``, and no ``add_tokens`` result contains a character still being assembled
    from several tokens.  U+FFFD from bytes that can never form a character (and genuine U+FFFD in the text) are
    emitted once they are followed by more text, or by ``flush``.  Each call decodes O(window + len(new_ids)) ids.

    ``clean_up_tokenization_spaces`` is always off: it rewrites text depending on what follows (" ." -> "."), which
    cannot be streamed, and transformers ignores it for BPE tokenizers anyway.

    ``prompt_ids`` supply left context only (their text is never emitted), so decoders that depend on the previous
    token (SentencePiece's leading space) stream the output as it reads after the prompt.  For byte-level BPE the
    context changes nothing.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: list[int] | None = None,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._decode_kwargs = dict(
            skip_special_tokens=skip_special_tokens,
            spaces_between_special_tokens=spaces_between_special_tokens,
            clean_up_tokenization_spaces=False,
        )
        # Skipped special tokens decode to nothing, so they don't count towards the bytes of _KEEP_TOKENS.
        self._silent_ids: frozenset[int] = _special_ids(tokenizer) if skip_special_tokens else frozenset()
        self._window: list[int] = []
        self._emitted = 0  # characters of decode(self._window) that are emitted or are prompt context
        self._pieces: list[str] = []
        self._flushed = False
        if prompt_ids:
            context = list(prompt_ids[-_KEEP_TOKENS:])
            context_text = self._decode(context)
            # A prompt ending mid-character would glue its dangling bytes to the first output bytes; start clean.
            if not context_text.endswith(_REPLACEMENT):
                self._window, self._emitted = context, len(context_text)

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def add_tokens(self, new_ids: list[int]) -> str:
        """Append ``new_ids`` and return the text that became final since the previous call (may be "")."""
        if self._flushed:
            raise RuntimeError("add_tokens after flush: the detokenizer's output is already final")
        if not new_ids:
            return ""
        self._window.extend(new_ids)
        window_text = self._decode(self._window)
        held = 1 if window_text.endswith(_REPLACEMENT) else 0
        stable_end = len(window_text) - held
        delta = window_text[self._emitted:stable_end]
        self._emitted = max(self._emitted, stable_end)
        if len(self._window) > _MAX_WINDOW:
            self._trim_window(held)
        return self._record(delta)

    def flush(self) -> str:
        """Return whatever is still held back (U+FFFD if the output ends in bytes that never formed a character).

        Called once, when the request finishes; ``add_tokens`` is refused afterwards.
        """
        if self._flushed:
            return ""
        self._flushed = True
        window_text = self._decode(self._window)
        delta = window_text[self._emitted:]
        self._emitted = len(window_text)
        return self._record(delta)

    def _trim_window(self, held: int) -> None:
        """Drop ids from the left of the window, keeping the last ``_KEEP_TOKENS`` byte-carrying ids.

        ``held`` is 1 when the window text ends in the held-back U+FFFD.  The characters that differ between the old
        and the new window text (a character whose first bytes were dropped turns into U+FFFD, a leading space may
        be stripped) all sit at the start, inside the emitted part, and the held-back tail is decoded from the same
        bytes in both; so counting the emitted part from the end of the text stays exact.
        """
        start, carrying = len(self._window), 0
        while start > 0 and carrying < _KEEP_TOKENS:
            start -= 1
            carrying += self._window[start] not in self._silent_ids
        if carrying < _KEEP_TOKENS:  # mostly skipped special tokens
            if held:
                return  # the open UTF-8 sequence might reach back past any cut; try again once more bytes arrived
            start = len(self._window) - _KEEP_TOKENS  # nothing open: any cut is exact
        self._window = self._window[start:]
        self._emitted = len(self._decode(self._window)) - held

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, **self._decode_kwargs) if ids else ""

    def _record(self, delta: str) -> str:
        if delta:
            self._pieces.append(delta)
        return delta


def _special_ids(tokenizer: Any) -> frozenset[int]:
    """Ids that ``decode(..., skip_special_tokens=True)`` drops: the named special tokens and added tokens flagged
    special (e.g. SmolLM2's ``<repo_name>``, which ``all_special_ids`` does not list)."""
    ids = set(getattr(tokenizer, "all_special_ids", ()))
    for token_id, token in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(token, "special", False):
            ids.add(token_id)
    return frozenset(ids)


class StopStringMatcher:
    """Finds the first stop string in a stream of text deltas, holding back text that may begin one.

    Matching rule: the stop string whose occurrence *starts* earliest in the whole text wins; for equal starts the
    longer string wins (so trimming removes the most).  The rule depends only on the text, not on how it was split
    into deltas, so a complete match is reported only once no stop string that starts earlier, or at the same
    position and is longer, could still complete; until then the text from that position on is held back.  Held-back
    text is always a proper prefix of some stop string, hence shorter than the longest one.

    Empty stop strings are ignored (they would match before any text).
    """

    def __init__(self, stop: list[str], no_stop_trim: bool = False) -> None:
        self._stops = tuple(sorted({s for s in stop if s}, key=len, reverse=True))
        self._no_stop_trim = no_stop_trim
        self._held = ""
        self._matched: str | None = None
        self._done = False

    @property
    def matched(self) -> str | None:
        """The stop string that ended the text, once one has (also when it was found by ``flush``)."""
        return self._matched

    def feed(self, new_text: str) -> tuple[str, str | None]:
        """Consume ``new_text``; return (text safe to emit now, the stop string if one matched in this call).

        On a match the returned text ends right before the stop string (or right after it with ``no_stop_trim``);
        after a match (or a flush) every call returns ``("", None)``.
        """
        if self._done:
            return "", None
        text = self._held + new_text
        match_pos, match = self._first_match(text)
        hold_from = self._first_open_prefix(text, last=match_pos)
        if match is not None and hold_from is None:
            return self._finish_with(text, match_pos, match), match
        cut = len(text) if hold_from is None else hold_from
        self._held = text[cut:]
        return text[:cut], None

    def flush(self) -> str:
        """At the end of the stream: release held-back text.

        Stop strings that could still have completed now cannot, so a complete match waiting on them is final: the
        text is trimmed as in ``feed`` and ``matched`` is set.
        """
        if self._done:
            return ""
        text, self._held = self._held, ""
        self._done = True
        match_pos, match = self._first_match(text)
        if match is None:
            return text
        return self._finish_with(text, match_pos, match)

    def _finish_with(self, text: str, pos: int, match: str) -> str:
        self._matched, self._held, self._done = match, "", True
        return text[: pos + len(match)] if self._no_stop_trim else text[:pos]

    def _first_match(self, text: str) -> tuple[int, str | None]:
        """Earliest complete occurrence; longer stop strings come first in ``_stops``, so they win ties."""
        best_pos, best = len(text), None
        for stop in self._stops:
            pos = text.find(stop, 0, best_pos + len(stop))
            if pos != -1 and pos < best_pos:
                best_pos, best = pos, stop
        return best_pos, best

    def _first_open_prefix(self, text: str, last: int) -> int | None:
        """Earliest position ``<= last`` from which the rest of ``text`` is a proper prefix of some stop string."""
        if not self._stops:
            return None
        first = max(0, len(text) - len(self._stops[0]) + 1)
        for pos in range(first, min(last, len(text) - 1) + 1):
            tail = text[pos:]
            if any(len(stop) > len(tail) and stop.startswith(tail) for stop in self._stops):
                return pos
        return None


class RequestDecoder:
    """Detokenizer plus stop-string and stop-regex matchers for one request: what the engine streams to the client.

    ``step`` returns (delta text, matched stop string / stop_regex pattern, or None); once one matched, the caller
    finishes the request with ``{"type": "stop", "matched": ...}`` and later ``step`` calls return ``("", None)``
    without decoding.  ``finish`` returns the final delta when the request ends for another reason; a stop string
    can still be resolved there (see ``StopStringMatcher.flush``), in which case ``matched`` tells.

    Both matchers read the same detokenized text.  When a stop_regex matches, the text is cut after the match and
    a stop string completed within that text wins (it completed no later); otherwise the regex ends the output.
    """

    def __init__(
        self,
        tokenizer: Any,
        stop: list[str] | None = None,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        no_stop_trim: bool = False,
        prompt_ids: list[int] | None = None,
        stop_regex: list[str] | None = None,
    ) -> None:
        # Without a tokenizer (--skip-tokenizer-init) there is no text: every delta is empty.
        self._detokenizer = None if tokenizer is None else IncrementalDetokenizer(
            tokenizer, prompt_ids, skip_special_tokens, spaces_between_special_tokens
        )
        self._matcher = StopStringMatcher(stop or [], no_stop_trim)
        self._regex = StopRegexMatcher(stop_regex or [])
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """All text streamed so far (stop strings trimmed unless ``no_stop_trim``)."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    @property
    def matched(self) -> str | None:
        """The stop string or stop_regex pattern that ended the output, if any."""
        return self._matcher.matched or self._regex.matched

    def step(self, new_ids: list[int]) -> tuple[str, str | None]:
        """Consume newly generated ids; return (text to stream now, what matched in this step or None)."""
        if self.matched is not None or self._detokenizer is None:
            return "", None
        return self._consume(self._detokenizer.add_tokens(new_ids), final=False)

    def finish(self) -> str:
        """The last delta of a request that ended without (or before noticing) a stop string or regex."""
        if self.matched is not None or self._detokenizer is None:
            return ""
        return self._consume(self._detokenizer.flush(), final=True)[0]

    def _consume(self, text: str, final: bool) -> tuple[str, str | None]:
        text, pattern = self._regex.feed(text)
        delta, matched = self._matcher.feed(text)
        if matched is None and (pattern is not None or final):
            delta += self._matcher.flush()  # the text ends here: a stop string waiting on a longer one is final
            matched = self._matcher.matched or pattern
        return self._record(delta), matched

    def _record(self, delta: str) -> str:
        if delta:
            self._pieces.append(delta)
        return delta
