"""Data-parallel attention's groups and its exchange around the feed-forward, on four gloo ranks: the attention
groups are consecutive ranks; ``dp_gather`` gives every rank all DP ranks' tokens in DP-rank order and
``dp_scatter`` each rank its own rows back, for uneven token counts, zero included; ``exchange_dp_step``
agrees with them; the padded forms of CUDA graphs (``dp_gather_padded``, ``dp_scatter_padded``) give the same rows
at fixed offsets.  Values are small integers in float32, so every expectation is exact."""

from __future__ import annotations

import torch
import torch.multiprocessing as mp

from radixlm.distributed import (destroy_tensor_parallel, free_local_addr, get_attn_tp_group, get_dp_attention,
                                 get_tp_group, init_tensor_parallel)
from radixlm.distributed.dp_attention import (
    dp_gather, dp_gather_padded, dp_scatter, dp_scatter_padded, exchange_dp_step,
)

TP = 4
HIDDEN = 3
# Per dp size: token counts per DP rank, one list per step (uneven, one rank or all ranks with none)
COUNTS = {2: [[3, 5], [0, 2], [4, 0], [0, 0]], 4: [[1, 0, 3, 2], [0, 0, 0, 1]]}


def tokens_of(dp_rank: int, count: int) -> torch.Tensor:
    """DP rank ``dp_rank``'s hidden states [count, HIDDEN]: distinct integers naming rank, token and column."""
    return (100 * dp_rank + torch.arange(count * HIDDEN, dtype=torch.float32)).view(count, HIDDEN)


def check_rank(rank: int, addrs: dict[int, str]) -> None:
    torch.set_num_threads(1)
    for dp_size, addr in addrs.items():
        init_tensor_parallel(rank, TP, torch.device("cpu"), f"tcp://{addr}", dp_size)
        try:
            dp, attn_size = get_dp_attention(), TP // dp_size
            if dp_size == 1:  # DP attention off: attention is tensor-parallel over the TP group
                assert not dp.enabled and get_attn_tp_group() == get_tp_group()
                continue
            assert (dp.rank, dp.size, dp.tp) == (rank // attn_size, dp_size, get_tp_group())
            attn = get_attn_tp_group()
            assert (attn.rank, attn.size) == (rank % attn_size, attn_size)
            # the attention group sums over its own ranks only
            assert attn.all_reduce(torch.tensor([float(rank)])).item() == sum(
                range(dp.rank * attn_size, (dp.rank + 1) * attn_size))
            for counts in COUNTS[dp_size]:
                mine = tokens_of(dp.rank, counts[dp.rank])
                # DP rank 1 says its step cannot replay a graph: nobody's can
                assert exchange_dp_step(counts[dp.rank], dp.rank != 1, dp) == (counts, False)
                assert exchange_dp_step(counts[dp.rank], True, dp) == (counts, True)
                gathered = dp_gather(mine, counts, dp)
                assert torch.equal(gathered, torch.cat([tokens_of(d, n) for d, n in enumerate(counts)]))
                # a feed-forward sharded over the TP group: rank r's partial output is (r + 1) x, all-reduced
                out = dp.tp.all_reduce(gathered * (rank + 1))
                assert torch.equal(dp_scatter(out, counts, dp), mine * sum(range(1, TP + 1)))
                # padded to 8 rows a DP rank (a graph's size), the padding -1: DP rank d's rows at 8 d
                padded = torch.cat([mine, torch.full((8 - len(mine), HIDDEN), -1.0)])
                gathered = dp_gather_padded(padded, dp)
                assert gathered.shape == (dp_size * 8, HIDDEN)
                for d, n in enumerate(counts):
                    assert torch.equal(gathered[8 * d : 8 * d + n], tokens_of(d, n))
                    assert torch.equal(gathered[8 * d + n : 8 * d + 8], torch.full((8 - n, HIDDEN), -1.0))
                out = dp.tp.all_reduce(gathered * (rank + 1))
                assert torch.equal(dp_scatter_padded(out, dp), padded * sum(range(1, TP + 1)))
        finally:
            destroy_tensor_parallel()


def test_dp_groups_gather_scatter() -> None:
    addrs = {dp_size: free_local_addr() for dp_size in (1, *COUNTS)}
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=check_rank, args=(r, addrs)) for r in range(TP)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * TP
