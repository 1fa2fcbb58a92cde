"""Messages between the engine front end (tokenizer side) and the scheduler process(es), pickled over ZMQ."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from radixlm.sampling import SamplingParams
from radixlm.sampling.logprobs import LogprobOptions
from radixlm.scheduler.stats import SchedulerStats


@dataclass
class GenerateRequest:
    rid: str
    input_ids: list[int]
    sampling_params: SamplingParams  # normalized and verified
    seed: int
    logprob_options: LogprobOptions | None = None  # None: no logprobs
    return_hidden_states: bool = False  # send the final hidden state behind every output token
    dp_rank: int = 0  # data-parallel attention: the DP rank that serves it (the front end's dispatcher chose)
    lora_name: str | None = None  # the LoRA adapter it runs under (the front end checked it is served)


@dataclass
class AbortRequest:
    rid: str


@dataclass
class ControlRequest:
    """A question to the scheduler answered by a ``ControlReply`` with the same ``token``.

    ``kind``: ``"flush_cache"`` (ok only when no request is in flight), ``"get_state"`` (``Scheduler.state()``;
    under data-parallel attention the DP ranks' totals and their own states as a list under ``"dp"``),
    ``"load_lora_adapter"`` (``args``: ``name``, ``path``; the payload is the adapter's {"name", "rank",
    "target_modules"}, or {"message"} with the adapter's error when refused) or ``"unload_lora_adapter"``
    (``args``: ``name``; no request of it may be in flight).
    """

    token: str
    kind: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class ControlReply:
    token: str
    ok: bool
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass
class TokenOutput:
    """New tokens of one request since the last message; ``finished_reason`` set on its last message."""

    rid: str
    new_ids: list[int]
    finished_reason: dict[str, Any] | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    logprobs: dict[str, list] | None = None  # new entries since the last message (RequestLogprobs.drain)
    # On the first message only: seconds from arrival at the scheduler to admission, and of grammar compilation
    queue_time: float | None = None
    grammar_time: float | None = None
    hidden_states: list[list[float]] | None = None  # one [hidden] row per new output token, when asked for


@dataclass
class BatchTokenOutput:
    outputs: list[TokenOutput] = field(default_factory=list)
    stats: SchedulerStats | None = None


@dataclass
class SchedulerInfo:
    """Sent once by every TP rank when its model is loaded (the front end keeps the smallest limits)."""

    max_total_num_tokens: int
    max_running_requests: int
    context_length: int
    vocab_size: int

    @classmethod
    def smallest(cls, infos: list["SchedulerInfo"]) -> "SchedulerInfo":
        """The limits every rank can serve (DP ranks each have their own KV pool)."""
        return cls(*(min(values) for values in zip(*(dataclasses.astuple(i) for i in infos))))


@dataclass
class SchedulerFailure:
    """The scheduler's last message before it exits on an error (an exception escaping its loop, a watchdog
    timeout): the front end fails every request in flight with ``reason`` (HTTP 500) and takes no new ones."""

    reason: str
