"""The shared vocabulary of the engine.

- ``Req``: one request inside the scheduler (tokens, KV bookkeeping, progress, state).
- ``Batch`` -> ``BatchResult``: the contract between the scheduler and the executor.  A ``Batch`` is a plain
  description of one model step (rows, lengths, new token ids, KV slots, sampling inputs); the executor runs
  it and answers with plain results (next token ids, logprob values, optional hidden states).  The scheduler
  never touches a model tensor; the executor never touches a ``Req``.
- ``ForwardMode`` and ``ForwardBatch``: the device-side description of the step that the executor builds from a
  ``Batch`` and passes, explicitly, to the model, its layers and the attention backend.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import IntEnum, auto
from typing import TYPE_CHECKING, Any

import torch

from radixlm.lifecycle import ReqState, check_transition
from radixlm.sampling import SamplingParams
from radixlm.sampling.logprobs import LogprobOptions, LogprobValues

if TYPE_CHECKING:
    from radixlm.kernels.lora import LoraSegments
    from radixlm.attention.base import AttentionBackend
    from radixlm.mem import KVPool, ReqToTokenPool
    from radixlm.sampling import SamplingBatchInfo
    from radixlm.sampling.logprobs import RequestLogprobs

__all__ = ["Batch", "BatchResult", "ForwardBatch", "ForwardMode", "Req", "ReqState", "SamplingParams",
           "SamplingRows", "VerifyInput", "new_epoch"]


def _empty_slots() -> torch.Tensor:
    return torch.empty(0, dtype=torch.int64)


@dataclass(eq=False)
class Req:
    """One request inside the scheduler: its tokens, where its KV lives, and how far it has got.

    KV bookkeeping: the request's row ``req_pool_idx`` of ``req_to_token`` maps positions ``0 .. kv_len - 1``
    of ``origin_input_ids + output_ids`` to KV slots; ``kv_len`` counts the KV of every step launched so far.
    The first ``len(prefix_indices)`` of those slots belong to the radix cache (shared, locked through
    ``last_node``); the rest are owned by this request until it is cached or freed.

    ``state`` moves only through ``move_to`` along ``radixlm.lifecycle.TRANSITIONS``.
    """

    rid: str
    origin_input_ids: list[int]
    sampling_params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    state: ReqState = ReqState.NEW
    req_pool_idx: int | None = None
    prefix_indices: torch.Tensor = field(default_factory=_empty_slots)  # [prefix_len] int64 KV slots
    last_node: Any = None  # radix-tree node at the end of the locked prefix
    kv_len: int = 0  # tokens of origin_input_ids + output_ids whose KV is stored (or being stored)
    seed: int = 0
    logprobs: "RequestLogprobs | None" = None  # set when the request asked for logprobs
    grammar: Any = None  # xgrammar.GrammarMatcher of a constrained request, advanced with every output token
    eos_token_ids: frozenset[int] = frozenset()
    max_context_len: int = 1 << 31  # prompt + output may not exceed this
    # Model inputs beyond token ids
    # (position, [n, hidden]) spans of the prompt given as embeddings instead of token embeddings (image
    # features); their token ids are placeholders, so the prefix cache stops at the first span.
    input_embeds: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    # [3, len(origin_input_ids)] M-RoPE positions (temporal, height, width) of the prompt; a token after the
    # prompt at index i has position i + mrope_delta on all three axes.
    mrope_positions: torch.Tensor | None = None
    mrope_delta: int = 0
    return_hidden_states: bool = False
    lora_name: str | None = None  # the LoRA adapter this request runs under (None: the base model)
    hidden_states: list[torch.Tensor] = field(default_factory=list)  # [hidden] float32, one per output token
    # Progress
    extend_len: int = 0  # new tokens this request contributes to the step being planned
    cached_tokens: int = 0  # prompt tokens served from the radix cache at first admission
    num_retractions: int = 0
    finished_reason: dict[str, Any] | None = None  # {"type": "stop"|"length"|"abort", ...}
    created_time: float = 0.0
    queue_time: float | None = None  # seconds from arrival to first admission
    grammar_time: float | None = None  # seconds its grammar took to compile (constrained requests)

    def all_ids(self) -> list[int]:
        return self.origin_input_ids + self.output_ids

    @property
    def finished(self) -> bool:
        return self.state is ReqState.FINISHED

    @property
    def seq_len(self) -> int:
        return len(self.origin_input_ids) + len(self.output_ids)

    @property
    def cacheable_len(self) -> int:
        """Tokens that the prefix cache may key by id: all of them, unless part of the prompt came as
        embeddings (the placeholder ids there do not identify the content)."""
        return self.input_embeds[0][0] if self.input_embeds else self.seq_len

    def move_to(self, state: ReqState) -> None:
        check_transition(self.state, state, self.rid)
        self.state = state

    def finish(self, reason: dict[str, Any]) -> None:
        """End the request with ``reason`` (``{"type": "stop"|"length"|"abort", ...}``); the scheduler returns its
        memory.  A finished request stays finished with its first reason."""
        if self.finished:
            return
        self.finished_reason = reason
        self.move_to(ReqState.FINISHED)

    def check_finished(self) -> None:
        """Finish after a new output token, by SGLang's rules (EOS and stop ids end the request only once
        ``min_new_tokens`` are out; EOS is ignored with ``ignore_eos``)."""
        if self.finished:
            return
        p = self.sampling_params
        last = self.output_ids[-1]
        n = len(self.output_ids)
        if n >= p.min_new_tokens:
            if last in (p.stop_token_ids or ()):
                self.finish({"type": "stop", "matched": last})
                return
            if not p.ignore_eos and last in self.eos_token_ids:
                self.finish({"type": "stop", "matched": last})
                return
        if p.max_new_tokens is not None and n >= p.max_new_tokens:
            self.finish({"type": "length", "length": n})
        elif self.seq_len >= self.max_context_len:
            self.finish({"type": "length", "length": n})

    def positions_of(self, start: int, end: int) -> torch.Tensor | None:
        """M-RoPE positions ``[3, end - start]`` of sequence indices ``start .. end - 1``, or None for a
        request with plain positions."""
        if self.mrope_positions is None:
            return None
        prompt = self.mrope_positions.shape[1]
        parts = [self.mrope_positions[:, start:min(end, prompt)]]
        if end > prompt:
            after = torch.arange(max(start, prompt), end) + self.mrope_delta
            parts.append(after.expand(3, -1))
        return torch.cat(parts, dim=1)

    def embeds_in(self, start: int, end: int) -> list[tuple[int, torch.Tensor]]:
        """The parts of ``input_embeds`` that fall in sequence indices ``start .. end - 1``, as (index relative
        to ``start``, [n, hidden])."""
        out = []
        for pos, embeds in self.input_embeds:
            lo, hi = max(pos, start), min(pos + embeds.shape[0], end)
            if lo < hi:
                out.append((lo - start, embeds[lo - pos : hi - pos]))
        return out

    def reset_for_retraction(self) -> None:
        """Forget all KV bookkeeping; the request will be prefilled again (prompt + outputs so far)."""
        self.req_pool_idx = None
        self.prefix_indices = _empty_slots()
        self.last_node = None
        self.kv_len = 0
        self.extend_len = 0
        self.num_retractions += 1


class ForwardMode(IntEnum):
    """What kind of step a batch is.  The attention backends branch on it (or refuse it with a clear error)."""

    EXTEND = auto()  # new tokens of each request (a prompt or a chunk of it), after an optional cached prefix
    DECODE = auto()  # exactly one new token per request
    MIXED = auto()  # prefill chunks and one-token decode rows in one forward (--enable-mixed-chunk)
    TARGET_VERIFY = auto()  # k draft tokens per request under a per-request mask over them (speculation)
    IDLE = auto()  # no tokens: a rank with no work still runs the forward, so its collectives match its peers'

    @property
    def is_decode(self) -> bool:
        return self is ForwardMode.DECODE

    @property
    def is_extend(self) -> bool:
        """Ragged new tokens per request after a cached prefix: EXTEND, MIXED and TARGET_VERIFY."""
        return self in (ForwardMode.EXTEND, ForwardMode.MIXED, ForwardMode.TARGET_VERIFY)

    @property
    def is_idle(self) -> bool:
        return self is ForwardMode.IDLE


_epochs = itertools.count()


def new_epoch() -> int:
    """A fresh ``SamplingRows.epoch``: the executor builds new sampling state for the batch that carries it."""
    return next(_epochs)


@dataclass
class SamplingRows:
    """What the executor needs to sample each row's next token (per row, in batch order).

    ``epoch`` names the sequence of rows: a step with the same epoch as the step before it has the same rows in
    the same order, and the executor keeps the penalty state it built for them (advanced by each step's
    samples) instead of rebuilding it from ``output_ids``.
    """

    params: list[SamplingParams]
    seeds: list[int]
    prompt_ids: list[list[int]]
    output_ids: list[list[int]]  # outputs on the host (a pending placeholder token is not in them yet)
    epoch: int


@dataclass
class VerifyInput:
    """TARGET_VERIFY: each row's new tokens are draft tokens; ``masks[i]`` ([k_i, k_i] bool) says which new
    tokens each new token of row i sees (a tree: its ancestors and itself; a chain: causal).  Every token sees
    its row's whole cached prefix."""

    masks: list[torch.Tensor]


@dataclass
class Batch:
    """One model step, planned by the scheduler: plain data, no model tensors.

    Row i is the request in ``req_to_token`` row ``req_pool_indices[i]``, with ``prefix_lens[i]`` tokens already
    in KV and ``extend_lens[i]`` new ones (1 for every DECODE row and for the decode rows of a MIXED step).
    ``input_ids`` lists the new tokens, row after row; ``-(j + 1)`` stands for the token that the previous step
    sampled for its row j (still on the device: the overlap schedule plans a step before reading the last).
    ``out_cache_loc`` holds the KV slots the scheduler allocated for them (mapped in ``req_to_token``).
    """

    mode: ForwardMode
    req_pool_indices: list[int]
    prefix_lens: list[int]
    extend_lens: list[int]
    input_ids: list[int]
    out_cache_loc: torch.Tensor  # [num_tokens] int64 on the model's device
    sampling: SamplingRows | None = None  # None: greedy, no penalties
    # Per row: output logprob options (None: not asked), and the first prompt position whose logprob is wanted
    # (None: none in this step); the executor returns them for positions within this step's new tokens.
    logprobs: list[LogprobOptions | None] | None = None
    input_logprob_start: list[int | None] | None = None
    return_hidden_states: bool = False
    # (index among the batch's new tokens, [n, hidden]) embeddings that replace the token embeddings there
    input_embeds: list[tuple[int, torch.Tensor]] | None = None
    mrope_positions: torch.Tensor | None = None  # [3, num_tokens] int64 on the host, for M-RoPE models
    verify: VerifyInput | None = None  # TARGET_VERIFY only
    # Data-parallel attention: this step's new tokens on every DP rank, in DP-rank order (None: the executor
    # exchanges them with the other ranks), and whether every DP rank's step is a plain decode or IDLE (then a
    # CUDA graph may replay it on every rank, the ranks' rows padded alike)
    dp_token_counts: list[int] | None = None
    dp_all_decode: bool = False
    lora_names: list[str | None] | None = None  # per row, its LoRA adapter (None: no row uses one)

    @property
    def batch_size(self) -> int:
        return len(self.req_pool_indices)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def graph_compatible(self) -> bool:
        """An IDLE step, or a DECODE step of the form CUDA graphs are captured in: no M-RoPE positions, input
        embeddings or hidden states (``CudaGraphRunner.padded_size`` checks the same on the device batch)."""
        return self.mode.is_idle or (self.mode.is_decode and self.mrope_positions is None and not self.input_embeds
                                     and not self.return_hidden_states)

    @classmethod
    def idle(cls) -> "Batch":
        return cls(ForwardMode.IDLE, [], [], [], [], _empty_slots())


@dataclass
class BatchResult:
    """The executor's answer to one ``Batch``, on the host."""

    next_token_ids: list[int]  # [bs]: each row's token after its last new token
    output_logprobs: list[LogprobValues | None] | None = None  # per row, for rows that asked
    input_logprobs: list[LogprobValues | None] | None = None  # per row: its prompt positions in this step
    hidden_states: torch.Tensor | None = None  # [bs, hidden] float32, final hidden state of each row's last token
    verify_token_ids: list[list[int]] | None = None  # TARGET_VERIFY: greedy token after each new token, per row


@dataclass
class ForwardBatch:
    """One model step on the device, built by the executor from a ``Batch``.

    Token-major tensors are ragged: the new tokens of request 0, then of request 1, ...  For DECODE the
    ``extend_*`` fields are None and every request contributes one token; IDLE has no tokens at all.
    """

    forward_mode: ForwardMode
    batch_size: int
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64 (or [3, num_tokens] for M-RoPE), position of each new token
    req_pool_indices: torch.Tensor  # [bs] int64, row of each request in req_to_token
    seq_lens: torch.Tensor  # [bs] int64, tokens in KV after this step (prefix + new)
    seq_lens_cpu: list[int]
    out_cache_loc: torch.Tensor  # [num_tokens] int64, KV slot where each new token's K/V is stored
    req_to_token_pool: "ReqToTokenPool"
    kv_pool: "KVPool"
    attn_backend: "AttentionBackend"
    # EXTEND, MIXED, TARGET_VERIFY
    extend_prefix_lens: torch.Tensor | None = None  # [bs] int64, cached tokens before the new ones
    extend_seq_lens: torch.Tensor | None = None  # [bs] int64, new tokens per request
    extend_start_loc: torch.Tensor | None = None  # [bs] int64, offset of each request's first new token
    extend_prefix_lens_cpu: list[int] | None = None
    extend_seq_lens_cpu: list[int] | None = None
    # Per request, index (within its new tokens) from which logits of every token are returned as well as the
    # last token's; None returns only last-token logits.  Prompt logprobs are computed from these.
    extend_logits_start_cpu: list[int] | None = None
    # TARGET_VERIFY: flattened per-request [k, k] masks over the new tokens and where each request's starts
    custom_mask: torch.Tensor | None = None  # [sum(k_i^2)] bool
    mask_indptr: torch.Tensor | None = None  # [bs] int64
    # (token indices [n] int64, embeddings [n, hidden]) replacing the token embeddings at those indices
    embed_overrides: tuple[torch.Tensor, torch.Tensor] | None = None
    return_hidden_states: bool = False
    sampling_info: "SamplingBatchInfo | None" = None
    # Data-parallel attention: new tokens of every DP rank this step, host ints the same on every rank (the
    # feed-forward runs on all of them); None without DP attention.  ``dp_all_decode``: every DP rank's step is
    # graph-compatible (``Batch.graph_compatible``).  ``dp_padded_len``: set in a CUDA graph's batch (every DP
    # rank's rows padded to this many, the feed-forward on dp_size times as many; the counts are not read)
    dp_token_counts: list[int] | None = None
    dp_all_decode: bool = False
    dp_padded_len: int | None = None
    # LoRA: the batch's adapter segments over its tokens (radixlm.kernels.lora); None without --enable-lora
    lora: "LoraSegments | None" = None

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def is_decode(self) -> bool:
        return self.forward_mode.is_decode
