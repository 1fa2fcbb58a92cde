"""Log-probabilities a request asked for: of its prompt tokens (from ``logprob_start_len``) and of each output
token, optionally with the top-k alternatives and with chosen token ids.

Entries are ``(logprob, token_id)``; SGLang's third element (the token text) is added by the front end.
Output logprobs are taken from the distribution the token was sampled from (after penalties and temperature,
before top-k/top-p/min-p truncation); prompt logprobs from the model's raw distribution.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from radixlm.errors import InvalidRequestError
from radixlm.utils.device import to_device_async

Entry = tuple[float | None, int]
# The logprob reported for an impossible token (-inf, or NaN when nothing was possible): finite, because JSON
# has no infinity; the value vLLM's OpenAI server reports for the same case.
LOGPROB_FLOOR = -9999.0


@dataclass
class LogprobOptions:
    logprob_start_len: int = -1  # -1: no prompt logprobs
    top_logprobs_num: int = 0
    token_ids_logprob: list[int] | None = None

    @classmethod
    def from_request(cls, return_logprob: bool, logprob_start_len: int | None, top_logprobs_num: int | None,
                     token_ids_logprob: list[int] | None) -> "LogprobOptions | None":
        """SGLang's request fields -> options, or None when no logprobs are asked for."""
        if not return_logprob:
            return None
        if top_logprobs_num is not None and top_logprobs_num < 0:
            raise InvalidRequestError(f"top_logprobs_num must be >= 0, got {top_logprobs_num}", "top_logprobs_num")
        return cls(-1 if logprob_start_len is None else logprob_start_len, top_logprobs_num or 0,
                   list(token_ids_logprob) if token_ids_logprob else None)

    def input_start(self, prompt_len: int) -> int | None:
        """First prompt position whose logprob is returned, or None when none is."""
        if self.logprob_start_len < 0 or self.logprob_start_len >= prompt_len:
            return None
        return self.logprob_start_len


@dataclass
class RequestLogprobs:
    """What has been collected so far for one request; ``drain_*`` hand out what is new since the last call."""

    options: LogprobOptions
    input_token_logprobs: list[Entry] = field(default_factory=list)
    input_top_logprobs: list[list[Entry] | None] = field(default_factory=list)
    input_token_ids_logprobs: list[list[Entry] | None] = field(default_factory=list)
    input_done: bool = False
    output_token_logprobs: list[Entry] = field(default_factory=list)
    output_top_logprobs: list[list[Entry]] = field(default_factory=list)
    output_token_ids_logprobs: list[list[Entry]] = field(default_factory=list)
    _sent_outputs: int = 0
    _sent_inputs: bool = False

    def record_input_first(self, token_id: int) -> None:
        """Position 0 has no context: its logprob is None."""
        self.input_token_logprobs.append((None, token_id))
        self.input_top_logprobs.append(None)
        self.input_token_ids_logprobs.append(None)

    def record(self, values: "LogprobValues", output: bool) -> None:
        if output:
            self.output_token_logprobs += values.token_logprobs
            self.output_top_logprobs += values.top
            self.output_token_ids_logprobs += values.by_ids
        else:
            self.input_token_logprobs += values.token_logprobs
            self.input_top_logprobs += values.top
            self.input_token_ids_logprobs += values.by_ids

    def drain(self) -> dict[str, list]:
        """New entries since the last drain (prompt logprobs once, when complete)."""
        out: dict[str, list] = {}
        if self.input_done and not self._sent_inputs:
            out["input_token_logprobs"] = self.input_token_logprobs
            out["input_top_logprobs"] = self.input_top_logprobs
            out["input_token_ids_logprobs"] = self.input_token_ids_logprobs
            self._sent_inputs = True
        n = self._sent_outputs
        out["output_token_logprobs"] = self.output_token_logprobs[n:]
        out["output_top_logprobs"] = self.output_top_logprobs[n:]
        out["output_token_ids_logprobs"] = self.output_token_ids_logprobs[n:]
        self._sent_outputs = len(self.output_token_logprobs)
        return out


@dataclass
class LogprobValues:
    """Logprobs of some tokens of one request, on the host: entry i scores ``token_logprobs[i][1]``, with the
    top-k alternatives and the requested token ids at that position."""

    token_logprobs: list[Entry]
    top: list[list[Entry]]
    by_ids: list[list[Entry]]


@dataclass
class LogprobTensors:
    """``LogprobValues`` of several rows while still on the device (or on their way to the host)."""

    chosen: torch.Tensor  # [n] float32, logprob of the scored token
    token_ids: torch.Tensor  # [n] int64, the scored tokens
    top_values: torch.Tensor | None  # [n, k] float32
    top_indices: torch.Tensor | None  # [n, k] int64
    by_ids: torch.Tensor | None  # [n, len(ids)] float32
    ids: list[int] | None

    @classmethod
    def of(cls, logprobs: torch.Tensor, token_ids: torch.Tensor | list[int],
           options: LogprobOptions) -> "LogprobTensors":
        """From ``logprobs`` [n, vocab] and the token each row scores (a host list, or a device tensor such as
        freshly sampled ids); device ops only, nothing is read back."""
        index = token_ids if isinstance(token_ids, torch.Tensor) else to_device_async(token_ids, logprobs.device)
        chosen = logprobs.gather(1, index.view(-1, 1))[:, 0]
        top_values = top_indices = by_ids = None
        if options.top_logprobs_num > 0:
            top_values, top_indices = logprobs.topk(min(options.top_logprobs_num, logprobs.shape[-1]), dim=-1)
        if options.token_ids_logprob:
            by_ids = logprobs[:, options.token_ids_logprob]
        return cls(chosen, index, top_values, top_indices, by_ids, options.token_ids_logprob)

    def to(self, copy: Callable[[torch.Tensor], torch.Tensor]) -> "LogprobTensors":
        """The same values with every tensor passed through ``copy`` (e.g. an asynchronous copy to the host)."""
        def opt(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else copy(t)

        return LogprobTensors(copy(self.chosen), copy(self.token_ids), opt(self.top_values), opt(self.top_indices),
                              opt(self.by_ids), self.ids)

    def values(self) -> LogprobValues:
        """Read on the host (call once the copy has completed).

        A token that a grammar or ``min_tokens`` forbids has logprob -inf, which JSON cannot carry: it is left
        out of the top-k alternatives (it is no alternative; the list may come out shorter than asked) and
        reported as ``LOGPROB_FLOOR`` where a token was named (the chosen one, ``token_ids_logprob``)."""
        n = self.token_ids.numel()
        tops: list[list[Entry]] = [[] for _ in range(n)]
        if self.top_values is not None:
            tops = [[(v, t) for v, t in zip(vs, ts) if math.isfinite(v)]
                    for vs, ts in zip(self.top_values.tolist(), self.top_indices.tolist())]
        by_ids: list[list[Entry]] = [[] for _ in range(n)]
        if self.by_ids is not None:
            by_ids = [[(_finite(v), t) for v, t in zip(vs, self.ids)] for vs in self.by_ids.tolist()]
        return LogprobValues([(_finite(v), t) for v, t in zip(self.chosen.tolist(), self.token_ids.tolist())],
                             tops, by_ids)


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else LOGPROB_FLOOR
