"""Log-probabilities a request asked for: of its prompt tokens (from ``logprob_start_len``) and of each output
token, optionally with the top-k alternatives and with chosen token ids.

Entries are ``(logprob, token_id)``; SGLang's third element (the token text) is added by the front end.
Output logprobs are taken from the distribution the token was sampled from (after penalties and temperature,
before top-k/top-p/min-p truncation); prompt logprobs from the model's raw distribution.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

Entry = tuple[float | None, int]


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
            raise ValueError(f"top_logprobs_num must be >= 0, got {top_logprobs_num}")
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

    def record(self, rows: torch.Tensor, token_ids: list[int], output: bool) -> None:
        """``rows``: [n, vocab] log-probs; ``token_ids``: the token each row scored."""
        chosen = rows.gather(1, torch.tensor(token_ids, device=rows.device).view(-1, 1))[:, 0].tolist()
        entries = list(zip(chosen, token_ids))
        k = self.options.top_logprobs_num
        tops = _top(rows, k) if k > 0 else [[] for _ in token_ids]
        ids = self.options.token_ids_logprob
        by_id = _by_ids(rows, ids) if ids else [[] for _ in token_ids]
        if output:
            self.output_token_logprobs += entries
            self.output_top_logprobs += tops
            self.output_token_ids_logprobs += by_id
        else:
            self.input_token_logprobs += entries
            self.input_top_logprobs += tops
            self.input_token_ids_logprobs += by_id

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


def _top(rows: torch.Tensor, k: int) -> list[list[Entry]]:
    values, indices = rows.topk(min(k, rows.shape[-1]), dim=-1)
    return [list(zip(v, i)) for v, i in zip(values.tolist(), indices.tolist())]


def _by_ids(rows: torch.Tensor, ids: list[int]) -> list[list[Entry]]:
    values = rows[:, ids].tolist()
    return [list(zip(v, ids)) for v in values]
