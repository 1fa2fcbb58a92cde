"""An executor without a model, for scheduler tests that run in milliseconds (vLLM v1's model-free style).

``FakeWorker`` speaks the scheduler/executor contract (``launch`` / ``sample`` / ``result``) over real memory
bookkeeping (``KVMemory``).  Its "model" is a pure function of a request's LoRA adapter and whole token sequence,
so every request must get the same tokens however it is batched, chunked, cached, retracted or overlapped.  It
also checks the scheduler's KV bookkeeping the way attention would read it: a shadow KV buffer records, for every
slot, the adapter and token sequence its KV was computed for; each step checks that every slot a row reads (its
cached prefix) holds the KV of exactly the tokens at those positions under the row's adapter, and that the
step's new slots are the ones mapped in ``req_to_token``.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from radixlm.core import Batch, BatchResult
from radixlm.lora import LoRAAdapterError
from radixlm.mem import KVMemory

VOCAB = 50
EOS = 1


def next_token(seq: tuple[int, ...], adapter: str | None = None) -> int:
    """The fake model: a deterministic function of the LoRA adapter and the whole sequence, never the padding
    id 0."""
    h = 7 if adapter is None else 11 + sum(map(ord, adapter))
    for t in seq:
        h = (h * 31 + t + 1) % 1_000_003
    return 2 + h % (VOCAB - 2)


@dataclass
class FakeLaunch:
    batch: Batch
    seqs: list[tuple[int, ...]]  # per row: the whole sequence up to its last new token
    adapters: list[str | None]  # per row: its LoRA adapter


class FakePending:
    def __init__(self, result: BatchResult) -> None:
        self._result = result
        self.read = False

    def result(self) -> BatchResult:
        self.read = True
        return self._result


class FakeWorker:
    """See the module docstring.  ``batches`` records every launched ``Batch``; ``masks`` the grammar mask
    passed with each step (None when no row was constrained)."""

    def __init__(self, max_total_tokens: int = 256, page_size: int = 1, max_running_requests: int = 16,
                 context_length: int = 512, token_fn=next_token) -> None:
        self.model_config = SimpleNamespace(context_length=context_length, vocab_size=VOCAB, eos_token_ids=(EOS,),
                                            model_path="fake")
        self.memory = KVMemory.create(max_total_tokens, page_size, max_running_requests, context_length, "cpu")
        self.tp_size = 1
        self.device = torch.device("cpu")
        self.token_fn = token_fn
        self.batches: list[Batch] = []
        self.masks: list[Any] = []
        # slot -> (LoRA adapter, the token sequence whose last token's KV it holds)
        self.kv: dict[int, tuple[str | None, tuple[int, ...]]] = {}
        self._prev: list[int] | None = None  # last step's sampled tokens, by row
        self.adapters: dict[str, str] = {}  # loaded LoRA adapters: name -> path

    def launch(self, batch: Batch) -> FakeLaunch:
        self.batches.append(batch)
        if batch.mode.is_idle:
            return FakeLaunch(batch, [], [])
        table = self.memory.req_to_token_pool.req_to_token
        slots = batch.out_cache_loc.tolist()
        assert len(slots) == batch.num_tokens == sum(batch.extend_lens)
        ids = [t if t >= 0 else self._prev[-t - 1] for t in batch.input_ids]
        adapters = batch.lora_names or [None] * len(batch.req_pool_indices)
        seqs, offset = [], 0
        for row, prefix, ext, adapter in zip(batch.req_pool_indices, batch.prefix_lens, batch.extend_lens, adapters):
            mapped = table[row, : prefix + ext].tolist()
            assert mapped[prefix:] == slots[offset : offset + ext], "new slots differ from req_to_token"
            seq = self.kv[mapped[prefix - 1]][1] if prefix else ()
            for pos in range(prefix):  # what attention reads: the KV of exactly this sequence's tokens and adapter
                assert self.kv.get(mapped[pos]) == (adapter, seq[: pos + 1]), f"slot {mapped[pos]} holds other KV"
            seq = seq + tuple(ids[offset : offset + ext])
            for i, slot in enumerate(slots[offset : offset + ext]):
                assert slot != 0, "a real token wrote its KV to the padding slot"
                self.kv[slot] = (adapter, seq[: prefix + i + 1])
            seqs.append(seq)
            offset += ext
        return FakeLaunch(batch, seqs, adapters)

    def sample(self, launch: FakeLaunch, grammar_mask: Any = None) -> FakePending:
        self.masks.append(grammar_mask)
        tokens = []
        for i, (seq, adapter) in enumerate(zip(launch.seqs, launch.adapters)):
            token = self.token_fn(seq, adapter)
            if grammar_mask is not None and i in grammar_mask.rows:
                token = _first_allowed(grammar_mask.bitmask[i], token)
            tokens.append(token)
        self._prev = tokens
        return FakePending(BatchResult(tokens))

    def memory_used_bytes(self) -> int:
        return 0

    def load_lora_adapter(self, name: str, path: str) -> dict:
        """ModelWorker's contract over a dict of names: a path containing "bad" is a bad adapter."""
        if "bad" in path:
            raise LoRAAdapterError(f"LoRA adapter {name!r} at {path}: adapter_config.json is missing")
        if name in self.adapters:
            raise LoRAAdapterError(f"LoRA adapter {name!r} is already loaded")
        self.adapters[name] = path
        return {"name": name, "rank": 8, "target_modules": ["q_proj"]}

    def unload_lora_adapter(self, name: str) -> None:
        del self.adapters[name]  # KeyError if unknown, like ModelWorker


def _first_allowed(bits: torch.Tensor, preferred: int) -> int:
    """The preferred token if the row's bitmask allows it, else the smallest allowed one."""
    allowed = [t for t in range(VOCAB) if (int(bits[t // 32]) >> (t % 32)) & 1]
    return preferred if preferred in allowed else allowed[0]


# ------------------------------------------------------------------------------------------ fake grammars


class FakeMatcher:
    """A grammar that allows exactly the tokens of ``script`` in order, then terminates."""

    def __init__(self, script: list[int]) -> None:
        self.script = script
        self.pos = 0

    def is_terminated(self) -> bool:
        return self.pos >= len(self.script)

    def accept_token(self, token: int) -> bool:
        if self.is_terminated() or token != self.script[self.pos]:
            return False
        self.pos += 1
        return True

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row] = 0
        token = self.script[self.pos]
        bitmask[row, token // 32] = torch.tensor(1 << (token % 32), dtype=torch.int64).to(torch.int32)


class FakeGrammarBackend:
    """Compilations that finish when the test says so: ``futures[i]`` is the i-th compile's future."""

    def __init__(self) -> None:
        self.futures: list[Future] = []

    def compile(self, spec: Any) -> Future:
        self.futures.append(Future())
        return self.futures[-1]

    def expire(self) -> None:
        pass

    def next_deadline(self) -> float | None:
        return None


def patch_matchers(monkeypatch) -> None:
    """Make the scheduler's grammar queue wrap a compiled 'grammar' (a token script) in a ``FakeMatcher``."""
    import radixlm.scheduler.grammar as grammar_module

    monkeypatch.setattr(grammar_module, "new_matcher", lambda compiled: FakeMatcher(list(compiled)))


# ------------------------------------------------------------------------------------------ memory invariant


def check_memory(sched) -> None:
    """Every KV page is in exactly one place: the allocator's free list, the radix tree, or one live request
    (the part of its row beyond its cached prefix); counters agree with the tree."""
    memory = sched.memory
    p = memory.page_size
    allocator = memory.allocator
    allocator.free_group_end()  # merge pending frees
    free = allocator._free_pages.tolist()
    cache = sched.tree_cache
    tree, stack = [], [cache.root(ns) for ns in cache.namespaces()]
    while stack:
        node = stack.pop()
        stack.extend(node.children.values())
        if node.parent is not None:
            tree += (node.value[::p] // p).tolist()
    live = [r for r in _live(sched) if r.req_pool_idx is not None]
    owned = []
    table = memory.req_to_token_pool.req_to_token
    for req in live:
        start = req.prefix_indices.numel()
        assert start % p == 0
        owned += (table[req.req_pool_idx, start : req.kv_len : p].long() // p).tolist()
    everything = free + tree + owned
    assert len(everything) == len(set(everything)), "a KV page is in two places"
    assert set(everything) == set(range(1, allocator.num_pages + 1)), "a KV page is lost"
    assert sched.tree_cache.total_size() == len(tree) * p
    rows = [r.req_pool_idx for r in live]
    assert len(rows) == len(set(rows))
    assert memory.req_to_token_pool.available_size() + len(rows) == memory.req_to_token_pool.size


def _live(sched) -> list:
    reqs = list(sched.running) + list(sched.waiting)
    if sched.chunked_req is not None and sched.chunked_req not in reqs:
        reqs.append(sched.chunked_req)
    return reqs
