"""Data-parallel attention's exchange around the feed-forward: every DP rank's tokens in, this DP rank's out.

Under ``--enable-dp-attention`` each DP rank runs attention on its own requests (``DPAttention``: the ranks of its
attention group hold the same hidden states), while the feed-forward (dense MLP, routed and shared experts) is
sharded over the whole TP group, so every rank must run it on the tokens of all DP ranks:

    hidden [counts[dp.rank], h] --dp_gather--> [sum(counts), h] --mlp (its all-reduce over tp_size ranks)-->
    [sum(counts), h] --dp_scatter--> [counts[dp.rank], h]

``counts`` (tokens per DP rank this step, host ints every rank knows; ``exchange_dp_step`` finds them) fix
every shape, so a DP rank with no tokens (an IDLE step) runs the same collectives with empty inputs.  A CUDA graph
cannot depend on them: a step every rank replays from graphs has every rank's rows padded to the graph's size
(``padded_len``: the graph runner pads them, an IDLE rank's all padding), and the feed-forward runs on
``dp_size * padded_len`` rows, the padding included (``dp_gather_padded``, ``dp_scatter_padded``).

Gathering is an all-gather over the whole TP group of every rank's rows padded to ``max(counts)``; the A ranks of
one attention group send the same rows and the first one's are kept.  Each rank receives ``tp_size * max * h``
(times (tp_size - 1) / tp_size), against ``2 * dp_size * max * h`` for an all-reduce of a buffer that one rank per
group fills: the all-gather moves less while A <= 2 (A = 1 in DeepSeek's usual dp_size = tp_size), the all-reduce
beyond.  Scattering is a slice: the feed-forward's own all-reduce already summed its partial outputs on every rank
(a reduce-scatter would move half as much at A = 1, at the cost of un-reduced MLP variants).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from radixlm.distributed.parallel_state import DPAttention


def dp_gather(hidden: torch.Tensor, counts: list[int], dp: DPAttention) -> torch.Tensor:
    """``hidden`` [counts[dp.rank], h], this DP rank's tokens -> [sum(counts), h]: all DP ranks' tokens, DP rank
    0's first.  Every rank of the TP group must call it with the same ``counts``."""
    n = hidden.shape[0]
    if n != counts[dp.rank]:
        raise ValueError(f"DP rank {dp.rank} has {n} tokens but the step's DP token counts say {counts[dp.rank]}")
    if len(counts) != dp.size:
        raise ValueError(f"{len(counts)} DP token counts for {dp.size} DP ranks")
    most = max(counts)
    # [tp_size, most, h]: rank r's rows at [r]
    parts = dp.tp.all_gather(F.pad(hidden, (0, 0, 0, most - n)), dim=0).view(dp.tp.size, most, hidden.shape[1])
    return torch.cat([parts[d * dp.attn_tp.size, :count] for d, count in enumerate(counts)])


def dp_scatter(out: torch.Tensor, counts: list[int], dp: DPAttention) -> torch.Tensor:
    """``out`` [sum(counts), h], the feed-forward's output (already reduced over the TP group) -> this DP rank's
    rows [counts[dp.rank], h]."""
    start = sum(counts[: dp.rank])
    return out[start : start + counts[dp.rank]]


def dp_gather_padded(hidden: torch.Tensor, dp: DPAttention) -> torch.Tensor:
    """``hidden`` [padded_len, h], this DP rank's rows padded alike on every rank -> [dp_size * padded_len, h],
    DP rank d's at [d * padded_len, (d + 1) * padded_len).  Shapes depend on ``padded_len`` only (CUDA graphs)."""
    parts = dp.tp.all_gather(hidden, dim=0).view(dp.tp.size, *hidden.shape)  # [tp_size, padded_len, h]
    return parts[:: dp.attn_tp.size].reshape(dp.size * hidden.shape[0], hidden.shape[1])


def dp_scatter_padded(out: torch.Tensor, dp: DPAttention) -> torch.Tensor:
    """``out`` [dp_size * padded_len, h], the feed-forward's output -> this DP rank's [padded_len, h]."""
    return out.view(dp.size, -1, out.shape[-1])[dp.rank]


def exchange_dp_step(num_tokens: int, graph_compatible: bool, dp: DPAttention) -> tuple[list[int], bool]:
    """Every DP rank's token count for this step, from each rank's own (``num_tokens``), and whether every rank's
    step is graph-compatible, over the TP group's gloo group (host values: no device work is waited for).  The
    ranks of one attention group must agree."""
    if not dp.enabled:
        return [num_tokens], graph_compatible
    rows = gather_per_dp_rank([num_tokens, int(graph_compatible)], dp)
    return [n for n, _ in rows], all(flag for _, flag in rows)


def gather_per_dp_rank(values: list[int], dp: DPAttention) -> list[list[int]]:
    """Every DP rank's ``values`` (host ints, the same length on every rank), in DP-rank order, in one all-gather
    over the TP group's gloo group; RuntimeError when the ranks of an attention group disagree (they run the same
    scheduler on the same messages, so they never should)."""
    mine = torch.tensor(values, dtype=torch.int64)
    parts = [torch.empty_like(mine) for _ in range(dp.tp.size)]
    dist.all_gather(parts, mine, group=dp.tp.cpu_group)
    per_rank = [p.tolist() for p in parts]
    attn_size = dp.attn_tp.size
    if any(per_rank[r] != per_rank[r - r % attn_size] for r in range(dp.tp.size)):
        raise RuntimeError(f"the ranks of an attention group disagree on their step: {per_rank}")
    return per_rank[::attn_size]
