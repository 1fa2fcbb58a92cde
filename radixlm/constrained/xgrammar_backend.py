"""Structured output through XGrammar: JSON schemas, regular expressions, EBNF grammars and structural tags.

Three stages, each where it costs least:

- ``check_grammar`` parses a request's grammar without the tokenizer (microseconds to milliseconds), in the front
  end, so a bad schema, regex or grammar is a 400 naming the problem before anything reaches the scheduler.
- ``GrammarBackend.compile`` compiles it against the model's vocabulary on worker threads (a ``DeadlinePool``), so
  the scheduler loop never waits on a compilation; compiled grammars are kept in a bounded LRU cache keyed by
  (kind, text).  A grammar not compiled within ``--grammar-compile-timeout`` seconds fails its requests with a 400
  ("grammar compilation exceeded N s"); its compilation cannot be stopped and is abandoned to finish on its own
  thread (see ``compile_pool``), and while it runs, requests with the same grammar fail at once instead of starting
  another.
- Each request gets its own ``xgrammar.GrammarMatcher``; the scheduler turns the matchers of a batch into one
  ``TokenBitmask`` (``fill_token_bitmask``), the executor applies it to the logits rows of just the constrained
  requests before sampling (``apply_token_bitmask``: a Triton kernel on GPU, torch on CPU), and
  ``accept_token`` advances a matcher with each sampled token.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from radixlm.constrained.compile_pool import DeadlinePool
from radixlm.errors import InvalidRequestError

if TYPE_CHECKING:
    from radixlm.core import Req
    from radixlm.sampling import SamplingParams

# kind -> (xgrammar.Grammar parser used to check it, GrammarCompiler method that compiles it, their options).
# JSON: compact separators, no free whitespace: small models otherwise loop on spaces and newlines.
_XGRAMMAR_CALLS = {
    "json_schema": ("from_json_schema", "compile_json_schema", {"any_whitespace": False}),
    "regex": ("from_regex", "compile_regex", {}),
    "ebnf": ("from_ebnf", "compile_grammar", {}),
    "structural_tag": ("from_structural_tag", "compile_structural_tag", {}),
}
GRAMMAR_KINDS = tuple(_XGRAMMAR_CALLS)
# "[17:23:27] /project/cpp/regex_converter.cc:83: " in front of xgrammar's messages says nothing to a user.
_LOCATION = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*")
logger = logging.getLogger(__name__)
# Compilations past the timeout still burning a core each, at most; see compile_pool.DeadlinePool.
MAX_ABANDONED_COMPILATIONS = 4


@dataclass(frozen=True)
class GrammarSpec:
    kind: str  # one of GRAMMAR_KINDS
    text: str  # the schema (JSON text), the regex or the grammar

    @staticmethod
    def of(params: "SamplingParams") -> "GrammarSpec | None":
        for kind in GRAMMAR_KINDS:
            text = getattr(params, kind)
            if text is not None:
                return GrammarSpec(kind, text)
        return None


def _message(error: Exception) -> str:
    return _LOCATION.sub("", str(error).strip()).strip()


def check_grammar(spec: GrammarSpec) -> None:
    """Parse ``spec`` without the tokenizer; InvalidRequestError (param: the kind) naming the problem when it is
    invalid."""
    import xgrammar as xgr

    parse, _, options = _XGRAMMAR_CALLS[spec.kind]
    try:
        if spec.kind == "json_schema":
            json.loads(spec.text)
        getattr(xgr.Grammar, parse)(spec.text, **options)
    except json.JSONDecodeError as e:
        raise InvalidRequestError(f"invalid json_schema: not JSON ({e})", spec.kind) from e
    except Exception as e:  # xgrammar raises RuntimeError with the parser's message
        raise InvalidRequestError(f"invalid {spec.kind}: {_message(e)}", spec.kind) from e


class GrammarBackend:
    """Compiles grammars for one tokenizer on worker threads; ``compile`` returns a future of the compiled
    grammar (shared by every request with the same spec while it stays in the cache), answered within
    ``compile_timeout`` seconds as long as the owner calls ``expire`` regularly."""

    def __init__(self, tokenizer_path: str, vocab_size: int, stop_token_ids: tuple[int, ...], num_workers: int = 2,
                 cache_size: int = 512, compile_timeout: float = 30.0,
                 max_abandoned: int = MAX_ABANDONED_COMPILATIONS) -> None:
        self._tokenizer_path = tokenizer_path
        self._vocab_size = vocab_size
        self._stop_token_ids = list(stop_token_ids)
        self._pool = DeadlinePool(num_workers, compile_timeout, max_abandoned, self._timeout_error, self._finished_late,
                                  name="grammar")
        self._cache: OrderedDict[GrammarSpec, Future] = OrderedDict()
        self._cache_size = cache_size
        # Timed out and still compiling: their requests fail at once.  Own lock, taken innermost (the pool's
        # timeout callback adds to it under the pool's lock).
        self._overdue: set[GrammarSpec] = set()
        self._overdue_lock = threading.Lock()
        self._lock = threading.Lock()
        self._compiler_lock = threading.Lock()
        self._compiler: Any = None
        # Loading the tokenizer and indexing its vocabulary takes seconds on a busy CPU: done once, in the
        # background from startup, with the compile timeouts held meanwhile (it is not the grammars' doing).
        self._pool.hold()
        threading.Thread(target=self._build_compiler, daemon=True, name="grammar-init").start()

    def _build_compiler(self) -> None:
        try:
            self._get_compiler()
        except Exception:  # each compilation retries and reports it
            logger.exception("building the grammar compiler failed")
        finally:
            self._pool.release()

    def compile(self, spec: GrammarSpec) -> Future:
        with self._lock:
            future = self._cache.get(spec)
            with self._overdue_lock:
                overdue = spec in self._overdue
            if future is not None and (overdue or not (future.done() and future.exception() is not None)):
                self._cache.move_to_end(spec)
                return future
            future = self._pool.submit(spec, lambda: self._compile(spec))
            self._cache[spec] = future
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return future

    def expire(self) -> None:
        """Fail the compilations past their deadline (call regularly: the scheduler does, every step)."""
        self._pool.expire()

    def next_deadline(self) -> float | None:
        """When (``time.monotonic()``) the next compilation times out, if one is pending."""
        return self._pool.next_deadline()

    def _timeout_error(self, spec: GrammarSpec, started: bool) -> Exception:
        if started:
            with self._overdue_lock:
                self._overdue.add(spec)
        return InvalidRequestError(f"grammar compilation exceeded {self._pool.timeout:g} s "
                                   f"(--grammar-compile-timeout): simplify the {spec.kind}", spec.kind)

    def _finished_late(self, spec: GrammarSpec, compiled: Any, error: BaseException | None) -> None:
        """A timed-out compilation returned after all: the next request with its grammar uses the result."""
        with self._lock:
            with self._overdue_lock:
                self._overdue.discard(spec)
            if error is None and spec in self._cache:
                done: Future = Future()
                done.set_result(compiled)
                self._cache[spec] = done

    def _compile(self, spec: GrammarSpec) -> Any:
        _, compile_method, options = _XGRAMMAR_CALLS[spec.kind]
        try:
            compiled = getattr(self._get_compiler(), compile_method)(spec.text, **options)
        except Exception as e:  # the request's grammar, not the compiler, is at fault
            raise InvalidRequestError(f"invalid {spec.kind}: {_message(e)}", spec.kind) from e
        # A grammar that parses can still match nothing (`root ::= a  a ::= a`): it would leave no token to
        # sample from, so it fails here, once per spec, instead of at the request's first step.
        first = torch.zeros((1, -(-self._vocab_size // 32)), dtype=torch.int32)
        new_matcher(compiled).fill_next_token_bitmask(first, 0)
        if not first.any():
            raise InvalidRequestError(f"invalid {spec.kind}: it matches no text at all", spec.kind)
        return compiled

    def _get_compiler(self) -> Any:
        with self._compiler_lock:
            if self._compiler is None:
                import xgrammar as xgr
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(self._tokenizer_path)
                info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self._vocab_size,
                                                          stop_token_ids=self._stop_token_ids)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            return self._compiler


def new_matcher(compiled: Any) -> Any:
    import xgrammar as xgr

    return xgr.GrammarMatcher(compiled)


@dataclass
class TokenBitmask:
    """Which tokens each constrained row may sample next: ``bitmask`` [bs, ceil(vocab / 32)] int32 on the host
    (pinned for a GPU: an upload from pageable memory this large waits for the forward in flight), applied to the
    logits rows ``rows`` only."""

    bitmask: torch.Tensor
    rows: list[int]


def fill_token_bitmask(matchers: list[Any], vocab_size: int, pinned: bool) -> TokenBitmask | None:
    """The next-token masks of a batch whose row i is constrained by ``matchers[i]`` (None: unconstrained), or
    None when no row is.  (XGrammar's multi-threaded ``BatchGrammarMatcher`` filled a batch of 32 JSON-schema
    masks slower than this loop on the H100 host: 1.5 ms against 0.84 ms per step.)"""
    rows = [i for i, m in enumerate(matchers) if m is not None and not m.is_terminated()]
    if not rows:
        return None
    bitmask = torch.full((len(matchers), -(-vocab_size // 32)), -1, dtype=torch.int32, pin_memory=pinned)
    for i in rows:
        matchers[i].fill_next_token_bitmask(bitmask, i)
    return TokenBitmask(bitmask, rows)


def apply_token_bitmask(logits: torch.Tensor, mask: TokenBitmask) -> None:
    """Mask in place the logits rows ([bs, vocab] float32) of ``mask.rows`` to their allowed tokens."""
    import xgrammar as xgr

    device = logits.device
    if device.type != "cuda":
        xgr.apply_token_bitmask_inplace(logits, mask.bitmask, indices=mask.rows)
        return
    indices = torch.tensor(mask.rows, dtype=torch.int32, pin_memory=True)
    xgr.apply_token_bitmask_inplace(logits, mask.bitmask.to(device, non_blocking=True),
                                    indices=indices.to(device, non_blocking=True))


def warm_up_grammar_masks(vocab_size: int, device: torch.device) -> None:
    """Compile the GPU bitmask kernel (a Triton JIT, about a second) at startup instead of inside the first
    constrained decode step, where it would stall the whole batch."""
    if device.type != "cuda":
        return
    import xgrammar as xgr

    logits = torch.zeros(1, vocab_size, dtype=torch.float32, device=device)
    bitmask = torch.full((1, -(-vocab_size // 32)), -1, dtype=torch.int32, device=device)
    xgr.apply_token_bitmask_inplace(logits, bitmask, indices=torch.zeros(1, dtype=torch.int32, device=device))
    torch.cuda.synchronize(device)


def accept_token(req: "Req", token: int) -> None:
    """Advance the request's matcher with its new output token; the request stops when the grammar is complete
    (its matcher has accepted a stop token), and aborts if the token broke the grammar."""
    if req.grammar is None or req.finished:
        return
    if not req.grammar.accept_token(token):
        req.finish({"type": "abort", "message": f"token {token} does not fit the request's grammar"})
    elif req.grammar.is_terminated():
        req.finish({"type": "stop", "matched": token})
