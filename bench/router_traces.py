"""Seeded synthetic traces for the router simulator (bench/router_sim.py) and its HTTP emulation.

A trace is a list of sessions.  A session starts at ``start_s`` and sends its turns one after another: turn k+1 is
released ``think_s`` seconds after turn k's last token (a closed loop per session, as a user waits for the answer).
The prompt of turn k is the session's ``prefix`` (a shared system prompt, the same tuple object for every session
of a group), then every earlier turn's message and answer, then turn k's message:

    prompt_k = prefix + msg_0 + ans_0 + ... + msg_{k-1} + ans_{k-1} + msg_k

so a multi-turn chat's prompts extend each other, and a later turn can reuse the cache of the earlier ones.
Tokens are ints in [0, VOCAB); the routing text of a token is 4 characters (``token_text``), about English's
characters per token, and distinct tokens have distinct texts, so text prefixes and token prefixes coincide.

- ``chat``: ``users`` sessions arriving as a Poisson process, each with a uniform number of turns, exponential
  think times, all sharing one short system prompt (as one chat product's users do).
- ``shared_prompt``: ``groups`` long system prompts; ``requests`` one-turn sessions arriving as a Poisson process,
  each a random group's prompt plus a short unique question.
"""

from __future__ import annotations

import functools
import random
import string
from dataclasses import dataclass

ALPHABET = string.ascii_letters + string.digits  # 62 symbols
VOCAB = len(ALPHABET) ** 3  # 238,328 tokens, each " " + 3 symbols


def token_text(token: int) -> str:
    """The 4-character text of a token: injective over [0, VOCAB)."""
    a, rest = divmod(token, len(ALPHABET) ** 2)
    b, c = divmod(rest, len(ALPHABET))
    return " " + ALPHABET[a] + ALPHABET[b] + ALPHABET[c]


@functools.cache
def _texts() -> tuple[str, ...]:
    return tuple(map(token_text, range(VOCAB)))


def tokens_text(tokens: tuple[int, ...]) -> str:
    return "".join(map(_texts().__getitem__, tokens))


@dataclass(frozen=True)
class Turn:
    message: tuple[int, ...]  # the new user tokens of this turn
    answer: tuple[int, ...]  # the tokens the worker generates (len >= 1)
    think_s: float  # seconds after the previous turn's last token (ignored for the first turn)


@dataclass(frozen=True)
class Session:
    key: int  # the session's index in its trace
    start_s: float  # release time of the first turn
    prefix: tuple[int, ...]  # shared with the other sessions of the same group
    turns: tuple[Turn, ...]

    def prompt(self, k: int) -> tuple[int, ...]:
        """Turn k's prompt (see the module docstring)."""
        parts = [self.prefix]
        for turn in self.turns[:k]:
            parts += [turn.message, turn.answer]
        parts.append(self.turns[k].message)
        return sum(parts, ())


def _tokens(rng: random.Random, n: int) -> tuple[int, ...]:
    return tuple(rng.randrange(VOCAB) for _ in range(n))


def chat_trace(users: int, rate_per_s: float, seed: int, turns: tuple[int, int] = (4, 12),
               system_len: int = 200, first_msg: tuple[int, int] = (100, 400), msg: tuple[int, int] = (20, 150),
               answer: tuple[int, int] = (100, 400), think_mean_s: float = 2.0) -> list[Session]:
    """Multi-turn chat: ``users`` conversations starting as a Poisson process of rate ``rate_per_s``; each has
    ``randint(*turns)`` turns; the first message ``randint(*first_msg)`` tokens, later ones ``randint(*msg)``,
    answers ``randint(*answer)``; think times exponential with mean ``think_mean_s`` (0: none).  Lengths in tokens."""
    rng = random.Random(seed)
    system = _tokens(rng, system_len)
    sessions, t = [], 0.0
    for key in range(users):
        t += rng.expovariate(rate_per_s)
        n = rng.randint(*turns)
        session_turns = tuple(
            Turn(_tokens(rng, rng.randint(*(first_msg if k == 0 else msg))), _tokens(rng, rng.randint(*answer)),
                 0.0 if k == 0 or think_mean_s == 0 else rng.expovariate(1.0 / think_mean_s))
            for k in range(n))
        sessions.append(Session(key, t, system, session_turns))
    return sessions


def shared_prompt_trace(groups: int, requests: int, rate_per_s: float, seed: int,
                        system_len: tuple[int, int] = (2000, 4000), question: tuple[int, int] = (50, 150),
                        answer: tuple[int, int] = (100, 300)) -> list[Session]:
    """Shared system prompts: ``groups`` prompts of ``randint(*system_len)`` tokens; ``requests`` one-turn
    sessions as a Poisson process of rate ``rate_per_s``, each a uniformly random group's prompt plus a
    ``randint(*question)``-token question, answered in ``randint(*answer)`` tokens."""
    rng = random.Random(seed)
    systems = [_tokens(rng, rng.randint(*system_len)) for _ in range(groups)]
    sessions, t = [], 0.0
    for key in range(requests):
        t += rng.expovariate(rate_per_s)
        prefix = systems[rng.randrange(groups)]
        turn = Turn(_tokens(rng, rng.randint(*question)), _tokens(rng, rng.randint(*answer)), 0.0)
        sessions.append(Session(key, t, prefix, (turn,)))
    return sessions


def working_set_tokens(trace: list[Session]) -> int:
    """Distinct prompt+answer tokens the trace can cache: each distinct prefix once, plus every session's turns."""
    prefixes = {id(s.prefix): len(s.prefix) for s in trace}
    return sum(prefixes.values()) + sum(len(t.message) + len(t.answer) for s in trace for t in s.turns)
