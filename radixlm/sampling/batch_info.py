"""Per-batch sampling state as device tensors, built once per batch and updated per step."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from radixlm.sampling.params import SamplingParams, parse_token_id

_UINT64_MOD = 1 << 64
_INT64_MAX = (1 << 63) - 1


def _wrap_int64(seed: int) -> int:
    """Map any Python int onto int64 two's complement, so user seeds >= 2**63 still work."""
    seed %= _UINT64_MOD
    return seed - _UINT64_MOD if seed > _INT64_MAX else seed


def _flat_index(
    rows: Sequence[Iterable[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten ragged per-row id lists into (row index, column index) int64 tensors.

    Lets each [bs, vocab] table be built with one scatter instead of one op per request.
    """
    row_idx: list[int] = []
    col_idx: list[int] = []
    for i, ids in enumerate(rows):
        for token_id in ids:
            row_idx.append(i)
            col_idx.append(token_id)
    return (
        torch.tensor(row_idx, dtype=torch.int64, device=device),
        torch.tensor(col_idx, dtype=torch.int64, device=device),
    )


@dataclass
class SamplingBatchInfo:
    """Sampling parameters and penalty state of one batch, one row per request.

    Optional tables are None when no row of the batch needs them, so the sampler skips
    that work entirely. `output_counts` is present whenever any penalty that reads it
    (repetition, frequency, presence) is; `prompt_mask` whenever repetition penalty is.
    """

    temperatures: torch.Tensor  # [bs, 1] float32
    top_ps: torch.Tensor  # [bs] float32
    top_ks: torch.Tensor  # [bs] int64, clamped to vocab_size (vocab_size = no top-k)
    min_ps: torch.Tensor  # [bs] float32
    seeds: torch.Tensor  # [bs] int64
    steps: torch.Tensor  # [bs] int64, tokens already generated
    is_all_greedy: bool  # every row has top_k == 1
    need_top_p: bool  # some row has top_p < 1
    # Some row has 1 < top_k < vocab_size; greedy rows are answered by argmax, not by sorting.
    need_top_k: bool
    need_min_p: bool  # some row has min_p > 0
    logit_bias: torch.Tensor | None  # [bs, vocab] float32
    frequency_penalties: torch.Tensor | None  # [bs] float32
    presence_penalties: torch.Tensor | None  # [bs] float32
    repetition_penalties: torch.Tensor | None  # [bs] float32
    output_counts: torch.Tensor | None  # [bs, vocab] int32
    prompt_mask: torch.Tensor | None  # [bs, vocab] bool
    min_tokens_mask: torch.Tensor | None  # [bs, vocab] bool, banned until min_new_tokens reached
    min_new_tokens: torch.Tensor | None  # [bs] int64
    vocab_size: int

    @classmethod
    def from_requests(
        cls,
        params: list[SamplingParams],
        seeds: list[int],
        prompt_ids: list[list[int]],
        output_ids: list[list[int]],
        eos_token_ids: list[int] | set[int],
        vocab_size: int,
        device: torch.device | str,
    ) -> SamplingBatchInfo:
        """Build the batch tensors from normalized per-request params and token histories.

        `seeds[i]` is the resolved seed of request i (any Python int; wrapped to int64).
        `output_ids[i]` are the tokens generated so far; its length becomes `steps[i]`.
        All token ids must lie in [0, vocab_size).
        """
        bs = len(params)
        if not len(seeds) == len(prompt_ids) == len(output_ids) == bs:
            raise ValueError(
                f"batch size mismatch: {bs} params, {len(seeds)} seeds, "
                f"{len(prompt_ids)} prompts, {len(output_ids)} outputs"
            )
        dev = torch.device(device)

        def f32(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=dev)

        def i64(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=dev)

        top_ks = [vocab_size if p.top_k == -1 else min(p.top_k, vocab_size) for p in params]
        freq = [p.frequency_penalty for p in params]
        pres = [p.presence_penalty for p in params]
        rep = [p.repetition_penalty for p in params]
        use_freq = any(x != 0.0 for x in freq)
        use_pres = any(x != 0.0 for x in pres)
        use_rep = any(x != 1.0 for x in rep)

        output_counts = None
        if use_freq or use_pres or use_rep:
            output_counts = torch.zeros(bs, vocab_size, dtype=torch.int32, device=dev)
            rows, cols = _flat_index(output_ids, dev)
            ones = torch.ones(rows.numel(), dtype=torch.int32, device=dev)
            output_counts.index_put_((rows, cols), ones, accumulate=True)
        prompt_mask = None
        if use_rep:
            prompt_mask = torch.zeros(bs, vocab_size, dtype=torch.bool, device=dev)
            prompt_mask[_flat_index(prompt_ids, dev)] = True

        min_tokens_mask = None
        min_new_tokens = None
        if any(p.min_new_tokens > 0 for p in params):
            eos = set(eos_token_ids)
            banned = [
                eos.union(p.stop_token_ids or []) if p.min_new_tokens > 0 else set() for p in params
            ]
            min_tokens_mask = torch.zeros(bs, vocab_size, dtype=torch.bool, device=dev)
            min_tokens_mask[_flat_index(banned, dev)] = True
            min_new_tokens = i64([p.min_new_tokens for p in params])

        return cls(
            temperatures=f32([p.temperature for p in params]).view(bs, 1),
            top_ps=f32([p.top_p for p in params]),
            top_ks=i64(top_ks),
            min_ps=f32([p.min_p for p in params]),
            seeds=i64([_wrap_int64(s) for s in seeds]),
            steps=i64([len(ids) for ids in output_ids]),
            is_all_greedy=all(k == 1 for k in top_ks),
            need_top_p=any(p.top_p < 1.0 for p in params),
            need_top_k=any(1 < k < vocab_size for k in top_ks),
            need_min_p=any(p.min_p > 0.0 for p in params),
            logit_bias=cls._build_logit_bias(params, vocab_size, dev),
            frequency_penalties=f32(freq) if use_freq else None,
            presence_penalties=f32(pres) if use_pres else None,
            repetition_penalties=f32(rep) if use_rep else None,
            output_counts=output_counts,
            prompt_mask=prompt_mask,
            min_tokens_mask=min_tokens_mask,
            min_new_tokens=min_new_tokens,
            vocab_size=vocab_size,
        )

    @staticmethod
    def _build_logit_bias(
        params: list[SamplingParams], vocab_size: int, device: torch.device
    ) -> torch.Tensor | None:
        """[bs, vocab] additive bias table, or None when no request sets one."""
        if not any(p.logit_bias for p in params):
            return None
        rows: list[int] = []
        cols: list[int] = []
        values: list[float] = []
        for i, p in enumerate(params):
            for key, bias in (p.logit_bias or {}).items():
                rows.append(i)
                cols.append(parse_token_id(key))
                values.append(float(bias))
        table = torch.zeros(len(params), vocab_size, dtype=torch.float32, device=device)
        # accumulate: the keys "5" and 5 are distinct dict keys naming the same token.
        table.index_put_(
            (
                torch.tensor(rows, dtype=torch.int64, device=device),
                torch.tensor(cols, dtype=torch.int64, device=device),
            ),
            torch.tensor(values, dtype=torch.float32, device=device),
            accumulate=True,
        )
        return table

    def update(self, next_token_ids: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Record one sampled token per row (`next_token_ids` [bs] int64, same device), or only for the rows
        where the bool mask `rows` [bs] is set.

        Advances `steps`, which both moves every row to a fresh random stream and lifts
        the min_new_tokens ban once a row has generated enough tokens.
        """
        if self.output_counts is not None:
            counted = torch.ones_like(next_token_ids, dtype=torch.int32) if rows is None else rows.to(torch.int32)
            self.output_counts.scatter_add_(1, next_token_ids.view(-1, 1), counted.view(-1, 1))
        self.steps += 1 if rows is None else rows.to(torch.int64)
