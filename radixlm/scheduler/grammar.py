"""Requests waiting for their grammar: compiled on the grammar backend's worker threads, admitted when ready."""

from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, Future, wait

from radixlm.constrained import GrammarBackend, GrammarSpec, TokenBitmask, fill_token_bitmask, new_matcher
from radixlm.core import Req, ReqState
from radixlm.errors import InvalidRequestError


class GrammarQueue:
    """Constrained requests in state GRAMMAR_COMPILING, each with the future of its compiled grammar."""

    def __init__(self, backend: GrammarBackend | None, vocab_size: int, tp_size: int, pinned_masks: bool) -> None:
        self.backend = backend
        self.vocab_size = vocab_size
        self.tp_size = tp_size
        self.pinned_masks = pinned_masks
        self.pending: list[tuple[Req, Future]] = []

    def __len__(self) -> int:
        return len(self.pending)

    def add(self, req: Req, spec: GrammarSpec) -> None:
        """Start compiling ``spec`` for ``req``; without a backend the request finishes with an abort."""
        if self.backend is None:
            req.finish({"type": "abort", "message": "structured output needs --grammar-backend xgrammar and a "
                        "tokenizer"})
            return
        req.move_to(ReqState.GRAMMAR_COMPILING)
        self.pending.append((req, self.backend.compile(spec)))

    def poll(self, idle: bool) -> tuple[list[Req], list[Req]]:
        """(requests whose grammar is ready, with a fresh matcher; requests whose compilation failed, finished).

        A failed compilation (an invalid grammar, or one past ``--grammar-compile-timeout``) finishes its request
        with ``{"type": "abort", "message": ..., "status_code": 400, "param": kind}``: the front end answers the
        client with a 400.  With several TP ranks every rank must admit the same requests in the same step, so
        there the compilations are awaited (the ranks' worker threads finish at different times), up to the next
        compile deadline (a compilation finishing within moments of its deadline can then still end differently
        on two ranks).  When the scheduler is otherwise ``idle`` it waits briefly instead of spinning."""
        if not self.pending:
            return [], []
        futures = [f for _, f in self.pending]
        if self.tp_size > 1:
            deadline = self.backend.next_deadline()
            wait(futures, timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        elif idle:
            wait(futures, timeout=0.05, return_when=FIRST_COMPLETED)
        self.backend.expire()
        ready, failed, pending = [], [], []
        for req, future in self.pending:
            if not future.done():
                pending.append((req, future))
            elif (error := future.exception()) is not None:
                reason = {"type": "abort", "message": str(error)}
                if isinstance(error, InvalidRequestError):
                    reason.update(status_code=400, param=error.param)
                req.finish(reason)
                failed.append(req)
            else:
                req.grammar = new_matcher(future.result())
                req.grammar_time = time.time() - req.created_time
                ready.append(req)
        self.pending = pending
        return ready, failed

    def remove(self, rid: str) -> Req | None:
        for req, future in self.pending:
            if req.rid == rid:
                self.pending.remove((req, future))
                return req
        return None

    def bitmask(self, reqs: list[Req]) -> TokenBitmask | None:
        """The next-token masks of a step's rows (after each matcher has accepted the row's last token)."""
        if all(r.grammar is None for r in reqs):
            return None
        return fill_token_bitmask([None if r.finished else r.grammar for r in reqs], self.vocab_size,
                                  self.pinned_masks)
