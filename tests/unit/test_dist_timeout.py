"""``--dist-timeout``: a rank whose peers never join gives up after that many seconds (torch's default would hold
it for 10 minutes); the flag's validation."""

from __future__ import annotations

import multiprocessing
import time

import pytest
import torch

from radixlm.config import ServerArgs
from radixlm.distributed import free_local_addr


def lone_rank(addr: str, queue) -> None:
    from radixlm.distributed import init_tensor_parallel

    start = time.monotonic()
    try:
        init_tensor_parallel(0, 2, torch.device("cpu"), f"tcp://{addr}", timeout_s=2.0)
        queue.put(("joined", time.monotonic() - start))
    except Exception as exc:  # the rendezvous's timeout error: its type varies across torch versions
        queue.put((type(exc).__name__, time.monotonic() - start))


def test_a_rank_alone_gives_up_after_the_timeout() -> None:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=lone_rank, args=(free_local_addr(), queue))
    proc.start()
    outcome, elapsed = queue.get(timeout=120)
    proc.join(30)
    assert outcome != "joined" and 1.5 < elapsed < 60, (outcome, elapsed)


def test_dist_timeout_validated() -> None:
    assert ServerArgs(device="cpu", dist_timeout=5).dist_timeout == 5
    with pytest.raises(ValueError, match="--dist-timeout must be > 0"):
        ServerArgs(device="cpu", dist_timeout=0)
    with pytest.raises(ValueError, match="--nnodes must be >= 1") as exc:  # each check on its own, in one message
        ServerArgs(device="cpu", dist_timeout=-1, nnodes=0)
    assert "--dist-timeout must be > 0" in str(exc.value)
    with pytest.raises(ValueError, match=r"--node-rank must be in 0\.\.1") as exc:
        ServerArgs(device="cpu", dist_timeout=-1, nnodes=2, node_rank=2, dist_init_addr="127.0.0.1:5000", tp_size=2)
    assert "--dist-timeout must be > 0" in str(exc.value)
