"""The states of a request inside the scheduler and the one table of moves between them.

```
 NEW ──▶ GRAMMAR_COMPILING ──▶ WAITING ──▶ PREFILLING ──▶ DECODING ──▶ FINISHED
  │                            │  ▲  ▲          │              │
  │                            ▼  │  └──────────┴──────────────┘  retraction: KV to the cache, back in line
  │                         LOADING_KV ──▶ PREFILLING
  └──▶ RECEIVING_KV ──▶ DECODING
 every state but FINISHED ──▶ FINISHED (abort, rejection, error)
```

- ``GRAMMAR_COMPILING``: a constrained request whose grammar compiles on a worker thread.
- ``WAITING``: in the waiting queue (new, or retracted with its outputs kept).
- ``PREFILLING``: admitted; its prompt (prompt + outputs after a retraction) is being computed, chunk by chunk
  when long.  The step that computes its last chunk samples its first new token.
- ``DECODING``: in the running batch, one token per step (several per step under speculative decoding).
- ``FINISHED``: produces nothing more; the scheduler returns its memory at once.
- ``LOADING_KV`` (a hierarchical cache bringing its prefix back from host memory) and ``RECEIVING_KV`` (a decode
  server receiving the KV that a prefill server computed) are reserved for those features: the table already
  places them, so they land as additions.
"""

from __future__ import annotations

from enum import Enum


class ReqState(Enum):
    NEW = "new"
    GRAMMAR_COMPILING = "grammar_compiling"
    WAITING = "waiting"
    LOADING_KV = "loading_kv"
    RECEIVING_KV = "receiving_kv"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    FINISHED = "finished"


_S = ReqState
TRANSITIONS: dict[ReqState, frozenset[ReqState]] = {
    _S.NEW: frozenset({_S.GRAMMAR_COMPILING, _S.WAITING, _S.RECEIVING_KV, _S.FINISHED}),
    _S.GRAMMAR_COMPILING: frozenset({_S.WAITING, _S.FINISHED}),
    _S.WAITING: frozenset({_S.PREFILLING, _S.LOADING_KV, _S.FINISHED}),
    _S.LOADING_KV: frozenset({_S.WAITING, _S.PREFILLING, _S.FINISHED}),
    _S.RECEIVING_KV: frozenset({_S.DECODING, _S.FINISHED}),
    _S.PREFILLING: frozenset({_S.DECODING, _S.WAITING, _S.FINISHED}),
    _S.DECODING: frozenset({_S.WAITING, _S.FINISHED}),
    _S.FINISHED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A request was moved along an edge the table does not have: a scheduler bug, never a user error."""


def check_transition(old: ReqState, new: ReqState, rid: str) -> None:
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"request {rid}: {old.value} -> {new.value} is not a request state transition")
