"""``stop_regex`` (SGLang's sampling parameter): patterns compiled to a Thompson NFA and run over the output text as
it streams, one character at a time, in time linear in the text.

Python's ``re`` backtracks (``(a|a)*b`` over a few dozen ``a`` never returns) and cannot be interrupted, and the
search runs on the front end's receiver thread that delivers every request's tokens; a pattern sent by a client
must not be able to stall it.  So ``re`` only parses the pattern (its own parser, so the syntax is exactly
Python's), and the search is a Pike VM: the set of NFA states alive after each character, at most the program's
size, updated per character.  A step costs O(new characters x program size) however long the output is, and no
window limits how long a match may be.

Semantics, for a stream that is only known up to "now":

- The output stops at the **earliest point where some match ends**: the first prefix of the text that contains a
  match.  That does not depend on how the text was split into steps (as ``re.search`` per step would), except
  for the assertions that look at the next character (below).
- ``^`` and ``\\A`` match at the start of the output (``^`` also after a newline under ``(?m)``); ``$`` and ``\\Z``
  at the end of the text generated so far (``$`` also before a newline under ``(?m)``), and ``\\b``/``\\B`` take
  the end of the text so far as a non-word character: whether a pattern ending in them matches can depend on
  where a step ends.
- Supported: literals, classes (``[...]``, ``\\d\\w\\s`` and negations, ``.``), groups, alternation, every
  repeat (greedy or lazy: both find the same match ends), anchors, ``\\b``/``\\B``, fixed-width lookbehind
  (``(?<=...)``, ``(?<!...)``) and the flags ``i``, ``m``, ``s``, ``a``, ``x``.  Refused with a 400: lookahead,
  backreferences, conditionals, atomic groups and possessive repeats (they are not regular, or need the text
  ahead), patterns that can match the empty string (they would stop before any output), and patterns whose
  program exceeds ``MAX_STOP_REGEX_PROGRAM`` instructions (bounded repeats are unrolled: ``.{0,1000}`` is big).
"""

from __future__ import annotations

import re
import re._constants as sre  # the stdlib's regex opcodes
import re._parser as sre_parse  # the stdlib's own regex parser
from collections.abc import Callable
from dataclasses import dataclass, field

from radixlm.errors import InvalidRequestError
from radixlm.sampling.limits import MAX_STOP_REGEX_CHARS, MAX_STOP_REGEX_PROGRAM

CharTest = Callable[[str], bool]

# Instructions: ("char", test) and ("assert", check) go on to pc + 1; ("split", a, b); ("jmp", a); ("match", i).
# An assertion's check sees (position, previous char or None, next char or None, the text before the position).
Instruction = list


class _Unsupported(Exception):
    pass


def _is_word(c: str | None, ascii_only: bool) -> bool:
    return c is not None and (c.isalnum() or c == "_") and (c.isascii() or not ascii_only)


def _category(code: object, ascii_only: bool) -> CharTest:
    digit = (lambda c: "0" <= c <= "9") if ascii_only else str.isdecimal
    space = (lambda c: c in " \t\n\r\f\v") if ascii_only else str.isspace
    tests: dict[object, CharTest] = {
        sre.CATEGORY_DIGIT: digit, sre.CATEGORY_NOT_DIGIT: lambda c: not digit(c),
        sre.CATEGORY_SPACE: space, sre.CATEGORY_NOT_SPACE: lambda c: not space(c),
        sre.CATEGORY_WORD: lambda c: _is_word(c, ascii_only), sre.CATEGORY_NOT_WORD: lambda c: not _is_word(c, ascii_only),
    }
    if code not in tests:
        raise _Unsupported(f"character category {code}")
    return tests[code]


def _class_test(items: list, flags: int) -> CharTest:
    ascii_only = bool(flags & re.ASCII)
    negate, chars, ranges, categories = False, set(), [], []
    for op, av in items:
        if op is sre.NEGATE:
            negate = True
        elif op is sre.LITERAL:
            chars.add(chr(av))
        elif op is sre.RANGE:
            ranges.append(av)
        elif op is sre.CATEGORY:
            categories.append(_category(av, ascii_only))
        else:
            raise _Unsupported(f"{op} in a character class")

    def test(c: str) -> bool:
        o = ord(c)
        return (c in chars or any(lo <= o <= hi for lo, hi in ranges) or any(t(c) for t in categories)) != negate

    return test


def _ignoring_case(test: CharTest) -> CharTest:
    def folded(c: str) -> bool:
        return test(c) or any(len(v) == 1 and test(v) for v in (c.lower(), c.upper()))

    return folded


class _Compiler:
    """``re``'s parse tree -> an instruction list (Pike's construction)."""

    def __init__(self, limit: int) -> None:
        self.prog: list[Instruction] = []
        self.limit = limit
        self.lookbehind = 0  # the widest lookbehind: characters of history the matcher keeps

    def add(self, ins: Instruction) -> int:
        if len(self.prog) >= self.limit:
            raise _Unsupported(f"the pattern compiles to more than {self.limit} instructions; shorten its "
                               "bounded repeats")
        self.prog.append(ins)
        return len(self.prog) - 1

    def seq(self, items: list, flags: int) -> None:
        for op, av in items:
            self.node(op, av, flags)

    def char(self, test: CharTest, flags: int) -> None:
        self.add(["char", _ignoring_case(test) if flags & re.IGNORECASE else test])

    def node(self, op: object, av: object, flags: int) -> None:
        if op is sre.LITERAL:
            self.char(lambda c, x=chr(av): c == x, flags)
        elif op is sre.NOT_LITERAL:
            self.char(lambda c, x=chr(av): c != x, flags)
        elif op is sre.ANY:
            self.char((lambda c: True) if flags & re.DOTALL else (lambda c: c != "\n"), flags)
        elif op is sre.IN:
            self.char(_class_test(av, flags), flags)
        elif op is sre.SUBPATTERN:
            _, add_flags, del_flags, sub = av
            self.seq(sub.data, (flags | add_flags) & ~del_flags)
        elif op is sre.BRANCH:
            self.branch(av[1], flags)
        elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT):
            self.repeat(*av, flags)
        elif op is sre.AT:
            self.add(["assert", _anchor(av, flags)])
        elif op in (sre.ASSERT, sre.ASSERT_NOT):
            direction, sub = av
            if direction != -1:
                raise _Unsupported("lookahead ((?=...), (?!...)): the text ahead is not known yet")
            self.add(["assert", self.lookbehind_check(sub, flags, negative=op is sre.ASSERT_NOT)])
        else:
            names = {sre.GROUPREF: "backreferences", sre.GROUPREF_EXISTS: "conditional groups",
                     sre.ATOMIC_GROUP: "atomic groups", sre.POSSESSIVE_REPEAT: "possessive repeats"}
            raise _Unsupported(names.get(op, str(op)))

    def branch(self, branches: list, flags: int) -> None:
        exits = []
        for i, sub in enumerate(branches):
            split = self.add(["split", len(self.prog) + 1, None]) if i < len(branches) - 1 else None
            self.seq(sub.data, flags)
            exits.append(self.add(["jmp", None]))
            if split is not None:
                self.prog[split][2] = len(self.prog)
        for j in exits:
            self.prog[j][1] = len(self.prog)

    def repeat(self, lo: int, hi: int, sub: sre_parse.SubPattern, flags: int) -> None:
        for _ in range(lo):
            self.seq(sub.data, flags)
        if hi == sre.MAXREPEAT:
            loop = self.add(["split", len(self.prog) + 1, None])
            self.seq(sub.data, flags)
            self.add(["jmp", loop])
            self.prog[loop][2] = len(self.prog)
            return
        splits = []
        for _ in range(hi - lo):  # x{0,3} as (x(x(x)?)?)?
            splits.append(self.add(["split", len(self.prog) + 1, None]))
            self.seq(sub.data, flags)
        for s in splits:
            self.prog[s][2] = len(self.prog)

    def lookbehind_check(self, sub: sre_parse.SubPattern, flags: int, negative: bool) -> Callable:
        lo, hi = sub.getwidth()
        if lo != hi:  # re itself refuses these; kept for clarity
            raise _Unsupported("variable-width lookbehind")
        inner = _Compiler(self.limit - len(self.prog))
        inner.seq(sub.data, flags)
        inner.add(["match", 0])
        self.lookbehind = max(self.lookbehind, hi, inner.lookbehind)
        width, prog = hi, inner.prog

        def check(pos: int, prev: str | None, nxt: str | None, history: str) -> bool:
            if pos < width:
                return negative
            tail = history[len(history) - width:] if width else ""
            before = history[-width - 1] if len(history) > width else None
            return _fullmatch(prog, tail, pos - width, before, nxt, history[:len(history) - width]) != negative

        return check


def _anchor(code: object, flags: int) -> Callable:
    multiline, ascii_only = bool(flags & re.MULTILINE), bool(flags & re.ASCII)
    if code is sre.AT_BEGINNING_STRING or (code is sre.AT_BEGINNING and not multiline):
        return lambda pos, prev, nxt, history: pos == 0
    if code is sre.AT_BEGINNING:
        return lambda pos, prev, nxt, history: pos == 0 or prev == "\n"
    if code is sre.AT_END_STRING or (code is sre.AT_END and not multiline):
        return lambda pos, prev, nxt, history: nxt is None
    if code is sre.AT_END:
        return lambda pos, prev, nxt, history: nxt is None or nxt == "\n"
    if code is sre.AT_BOUNDARY:
        return lambda pos, prev, nxt, history: _is_word(prev, ascii_only) != _is_word(nxt, ascii_only)
    if code is sre.AT_NON_BOUNDARY:
        return lambda pos, prev, nxt, history: _is_word(prev, ascii_only) == _is_word(nxt, ascii_only)
    raise _Unsupported(f"anchor {code}")


def _closure(prog: list[Instruction], pcs: list[int], pos: int, prev: str | None, nxt: str | None,
             history: str) -> list[int]:
    """The "char" and "match" instructions reachable from ``pcs`` without consuming a character, at ``pos``."""
    seen: set[int] = set()
    out: list[int] = []
    stack = list(reversed(pcs))
    while stack:
        pc = stack.pop()
        if pc in seen:
            continue
        seen.add(pc)
        ins = prog[pc]
        kind = ins[0]
        if kind == "jmp":
            stack.append(ins[1])
        elif kind == "split":
            stack += (ins[2], ins[1])
        elif kind == "assert":
            if ins[1](pos, prev, nxt, history):
                stack.append(pc + 1)
        else:
            out.append(pc)
    return out


def _fullmatch(prog: list[Instruction], text: str, pos: int, prev: str | None, nxt: str | None,
               history: str) -> bool:
    """Whether ``prog`` matches all of ``text`` (a lookbehind's few characters), anchored at both ends."""
    threads = [0]
    for i, c in enumerate(text):
        alive = _closure(prog, threads, pos + i, prev, c, history + text[:i])
        threads = [pc + 1 for pc in alive if prog[pc][0] == "char" and prog[pc][1](c)]
        prev = c
        if not threads:
            return False
    return any(prog[pc][0] == "match" for pc in _closure(prog, threads, pos + len(text), prev, nxt, history + text))


@dataclass
class StopRegexes:
    """Compiled ``stop_regex`` patterns of one request (one program; ``match`` names the pattern's index)."""

    patterns: list[str]
    prog: list[Instruction] = field(default_factory=list)
    entries: list[int] = field(default_factory=list)
    lookbehind: int = 0


def compile_stop_regexes(patterns: list[str]) -> StopRegexes:
    """One program for all ``patterns``; InvalidRequestError (param ``stop_regex``) saying why one is refused."""
    compiler = _Compiler(MAX_STOP_REGEX_PROGRAM)
    entries = []
    for i, pattern in enumerate(patterns):
        tree = _parse(pattern)
        entries.append(len(compiler.prog))
        try:
            compiler.seq(tree.data, tree.state.flags)
            compiler.add(["match", i])
        except _Unsupported as e:
            raise InvalidRequestError(f"stop_regex {pattern!r} is not supported: {e}", "stop_regex") from e
    return StopRegexes(list(patterns), compiler.prog, entries, compiler.lookbehind)


def compile_stop_regex(pattern: str) -> StopRegexes:
    """Check one pattern (at submission); see ``compile_stop_regexes``."""
    return compile_stop_regexes([pattern])


def _parse(pattern: str) -> sre_parse.SubPattern:
    if len(pattern) > MAX_STOP_REGEX_CHARS:
        raise InvalidRequestError(f"stop_regex patterns may be at most {MAX_STOP_REGEX_CHARS} characters, got "
                                  f"{len(pattern)}", "stop_regex")
    try:
        tree = sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise InvalidRequestError(f"invalid stop_regex {pattern!r}: {e}", "stop_regex") from e
    if tree.getwidth()[0] == 0:
        raise InvalidRequestError(f"stop_regex {pattern!r} can match the empty string, so it would stop before "
                                  "any output", "stop_regex")
    return tree


class StopRegexMatcher:
    """Runs a request's ``stop_regex`` patterns over its output text as it streams.

    ``feed(new_text)`` returns (``new_text``, None), or, once a match ends in it, (its part up to the earliest
    match end, the pattern).  Among patterns ending at the same point, the first given wins.  The matched text
    stays in the output (as in SGLang, whatever ``no_stop_trim`` says); what follows it is cut.
    """

    def __init__(self, patterns: list[str]) -> None:
        self._regexes = compile_stop_regexes(patterns) if patterns else None
        self._threads: list[int] = []  # "char" instructions alive before the next character
        self._pos = 0  # characters seen
        self._prev: str | None = None
        self._history = ""  # the last characters, for lookbehinds
        self.matched: str | None = None

    def feed(self, new_text: str) -> tuple[str, str | None]:
        if self._regexes is None or not new_text or self.matched is not None:
            return new_text, None
        prog, keep = self._regexes.prog, self._regexes.lookbehind
        start = self._pos
        for c in new_text:
            if self._match_here(c):
                return new_text[: self._pos - start], self.matched
            self._threads = [pc + 1 for pc in self._alive if prog[pc][0] == "char" and prog[pc][1](c)]
            self._pos += 1
            self._prev = c
            if keep:
                self._history = (self._history + c)[-keep - 1:]
        if self._match_here(None):
            return new_text, self.matched
        return new_text, None

    def _match_here(self, nxt: str | None) -> bool:
        """Whether a match ends at the current position, ``nxt`` following it (None: the end of the text so far);
        leaves the alive instructions in ``self._alive``."""
        prog = self._regexes.prog
        self._alive = _closure(prog, self._threads + self._regexes.entries, self._pos, self._prev, nxt,
                               self._history)
        ends = [prog[pc][1] for pc in self._alive if prog[pc][0] == "match"]
        if ends:
            self.matched = self._regexes.patterns[min(ends)]
        return bool(ends)
