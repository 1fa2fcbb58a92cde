"""The lockstep of the DP ranks' schedulers under data-parallel attention.

Each DP rank schedules its own requests, but every forward is a collective over the whole TP group (the
feed-forward runs on all DP ranks' tokens), so in every scheduler step the ranks must agree whether a forward
runs, and with how many tokens per DP rank.  ``Scheduler.step`` plans this rank's step (or none) and calls
``sync`` exactly once; the answer decides for every rank alike:

    every rank planned nothing      -> no forward anywhere
    some rank planned a step        -> every rank launches: its plan, or an IDLE batch without tokens;
                                       every batch carries the gathered per-DP-rank token counts, and whether
                                       every rank's step is graph-compatible (then all replay CUDA graphs of
                                       one padded size, else all run eagerly: their collectives must match)

The same exchange carries whether each rank is idle (nothing queued, running or in flight), so the loop knows
when it may block on its socket without leaving a busy rank waiting in the next ``sync``: only when every rank
was idle.  A rank that turns idle during a step reports it in the next one (one extra, empty iteration).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from radixlm.distributed import DPAttention
from radixlm.distributed.dp_attention import gather_per_dp_rank

# This rank's values -> every DP rank's, in DP-rank order (one collective; the ranks of an attention group agree)
GatherPerDPRank = Callable[[list[int]], list[list[int]]]


class DPStep(NamedTuple):
    """What every DP rank launches with: the ranks' token counts, and whether every rank's step is
    graph-compatible (``Batch.graph_compatible``, a rank without a plan counting as IDLE)."""

    counts: list[int]
    all_decode: bool


class DPLockstep:
    """One DP rank's side of the exchange; ``gather`` is the collective (``over`` builds the real one, over the TP
    group's gloo group; the model-free tests pass an in-process one)."""

    def __init__(self, dp_rank: int, dp_size: int, attn_size: int, gather: GatherPerDPRank) -> None:
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.attn_size = attn_size  # TP ranks running this DP rank's requests in lockstep
        self._gather = gather
        self.all_idle = True  # every DP rank was idle at the last sync (all start idle)
        self.forward_ran = False  # some DP rank had a step at the last sync

    @classmethod
    def over(cls, dp: DPAttention) -> "DPLockstep":
        return cls(dp.rank, dp.size, dp.attn_tp.size, lambda values: gather_per_dp_rank(values, dp))

    def sync(self, num_tokens: int | None, idle: bool, graph_compatible: bool) -> DPStep | None:
        """``num_tokens``: this rank's planned step's new tokens, None for no step; ``idle``: this rank has no
        work at all; ``graph_compatible``: its planned step is (``Batch.graph_compatible``; ignored without a
        plan).  Returns every DP rank's token count for the step (0 for a rank without a plan) and whether all
        steps are graph-compatible, or None when no rank has a step."""
        planned = num_tokens is not None
        rows = self._gather([num_tokens if planned else -1, int(idle), int(graph_compatible or not planned)])
        self.all_idle = all(flag for _, flag, _ in rows)
        self.forward_ran = any(n >= 0 for n, _, _ in rows)
        if not self.forward_ran:
            return None
        return DPStep([max(n, 0) for n, _, _ in rows], all(graphable for _, _, graphable in rows))


__all__ = ["DPLockstep", "DPStep", "GatherPerDPRank"]
