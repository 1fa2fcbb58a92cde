"""Batched token sampling with per-request, counter-based (reproducible) randomness."""

from __future__ import annotations

from collections.abc import Callable

import torch

from radixlm.sampling.batch_info import SamplingBatchInfo


def _as_int64(c: int) -> int:
    """Reinterpret an unsigned 64-bit constant as the int64 with the same bits."""
    return c - (1 << 64) if c >= (1 << 63) else c


# splitmix64 constants (Steele, Lea & Flood 2014).
_GOLDEN = _as_int64(0x9E3779B97F4A7C15)
_MIX1 = _as_int64(0xBF58476D1CE4E5B9)
_MIX2 = _as_int64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits; torch's `>>` is arithmetic, so clear the sign fill."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finalizer on int64 tensors (multiplication wraps mod 2**64)."""
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def counter_uniform(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniforms u[i, v] = f(seeds[i], steps[i], v) strictly inside (0, 1), float64 [bs, vocab].

    Pure integer hashing: the value for a (seed, step, v) triple never depends on the
    other rows, the batch size, the device or any global RNG state.
    Scheme (all arithmetic mod 2**64):
        key = mix(mix(seed + G) + (step + 1) * G)
        u   = ((mix(key + (v + 1) * G) >> 12) + 0.5) / 2**52
    52 bits plus the half-offset is exact in float64 and can reach neither 0 nor 1.
    """
    key = _mix64(_mix64(seeds + _GOLDEN) + (steps + 1) * _GOLDEN).view(-1, 1)  # [bs, 1]
    offsets = (torch.arange(1, vocab_size + 1, dtype=torch.int64, device=seeds.device) * _GOLDEN)
    bits = _shr(_mix64(key + offsets.view(1, -1)), 12)  # [bs, vocab], < 2**52
    return (bits.to(torch.float64) + 0.5) * (2.0**-52)


# Far above any real logit (exp saturates long before), far below float32's max even after temperature (>= 1e-6).
PENALIZED_LOGIT_MAX = 1e4


class Sampler:
    """Turns final-position logits into next tokens for a whole batch.

    Penalties, then temperature, softmax, top-k -> top-p -> min-p filtering, then an
    exponential race `argmax(p / E)` with E = -log(u) from `counter_uniform`, which is an
    exact draw from the filtered distribution. Rows with top_k == 1 return the argmax of
    the penalized logits exactly. No Python loop over rows.

    ``argmax`` takes ``[bs, vocab]`` rows to their ``torch.argmax`` indices: the executor passes its kernel
    (``radixlm.kernels.argmax.row_argmax``); this package loads no kernels (the model-free scheduler imports it).
    """

    def __init__(self, argmax: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.argmax = argmax or (lambda rows: rows.argmax(dim=-1))

    def __call__(self, logits: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
        """logits [bs, vocab_size] float32 -> next token ids [bs] int64. Input is not modified."""
        logits = self.apply_penalties(logits, info)
        greedy = self.argmax(logits)  # [bs]
        if info.is_all_greedy:
            return greedy
        probs = torch.softmax(logits / info.temperatures, dim=-1)  # [bs, vocab]
        probs = self._filter(probs, info)
        noise = -torch.log(counter_uniform(info.seeds, info.steps, info.vocab_size))
        sampled = self.argmax(probs / noise.to(probs.dtype))  # [bs]
        return torch.where(info.top_ks == 1, greedy, sampled)

    def logprobs(self, logits: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
        """Log-probabilities of the distribution tokens are sampled from: penalties and temperature applied,
        before top-k/top-p/min-p truncation.  [bs, vocab] float32."""
        return torch.log_softmax(self.apply_penalties(logits, info) / info.temperatures, dim=-1)

    def apply_penalties(self, logits: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
        """Apply logit bias, repetition, frequency/presence and min-new-tokens bans, in that order.

        logits [bs, vocab] float32. Returns a new tensor when any penalty applies, else the
        input itself; the input is never modified in place. Temperature is not applied here.
        """
        if info.logit_bias is not None:
            logits = logits + info.logit_bias
        if info.repetition_penalties is not None:
            assert info.prompt_mask is not None and info.output_counts is not None
            seen = info.prompt_mask | (info.output_counts > 0)  # [bs, vocab]
            rep = info.repetition_penalties.view(-1, 1)  # [bs, 1]
            # Dividing positive and multiplying negative logits both make the token less likely.  A penalty near
            # 0 (allowed: it favours seen tokens) would divide by a float32 0 or overflow to inf, and inf logits
            # are NaN probabilities: the penalty is floored and the boosted logit capped.
            rep = rep.clamp(min=torch.finfo(logits.dtype).tiny)
            penalized = torch.where(logits > 0, (logits / rep).clamp(max=PENALIZED_LOGIT_MAX), logits * rep)
            logits = torch.where(seen, penalized, logits)
        if info.frequency_penalties is not None:
            assert info.output_counts is not None
            logits = logits - info.frequency_penalties.view(-1, 1) * info.output_counts.to(logits.dtype)
        if info.presence_penalties is not None:
            assert info.output_counts is not None
            present = (info.output_counts > 0).to(logits.dtype)  # [bs, vocab]
            logits = logits - info.presence_penalties.view(-1, 1) * present
        if info.min_tokens_mask is not None:
            assert info.min_new_tokens is not None
            active = (info.steps < info.min_new_tokens).view(-1, 1)  # [bs, 1]
            logits = logits.masked_fill(info.min_tokens_mask & active, float("-inf"))
        return logits

    @staticmethod
    def _filter(probs: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
        """Zero the probabilities excluded by top-k, top-p and min-p; the top token always survives.

        top-p is measured on the distribution renormalized after top-k (HF/vLLM order):
        a token is dropped when the kept mass ranked before it already reaches top_p.
        The result is not renormalized; the exponential race is scale-invariant.
        """
        if info.need_top_k or info.need_top_p:
            sorted_probs, order = probs.sort(dim=-1, descending=True)  # [bs, vocab]
            keep_sorted = torch.ones_like(sorted_probs, dtype=torch.bool)
            if info.need_top_k:
                ranks = torch.arange(info.vocab_size, device=probs.device).view(1, -1)
                keep_sorted &= ranks < info.top_ks.view(-1, 1)
            if info.need_top_p:
                kept = sorted_probs * keep_sorted
                cumulative = kept.cumsum(dim=-1)
                mass_before = cumulative - kept  # exactly 0 for rank 0, so it is always kept
                budget = info.top_ps.view(-1, 1) * cumulative[:, -1:]
                keep_sorted &= mass_before < budget
                keep_sorted[:, 0] = True  # also when top_p underflows to 0 in float32 (5e-324): budget 0
            keep = torch.empty_like(keep_sorted).scatter_(1, order, keep_sorted)
            probs = probs.masked_fill(~keep, 0.0)
        if info.need_min_p:
            max_p = probs.amax(dim=-1, keepdim=True)  # [bs, 1]
            probs = probs.masked_fill(probs < info.min_ps.view(-1, 1) * max_p, 0.0)
        return probs
