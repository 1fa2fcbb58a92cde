"""The DP ranks' schedulers in lockstep (``DPLockstep``), model-free: one scheduler and fake executor per DP rank,
each on its own thread, exchanging their plans through an in-process all-gather.

Every run checks that the ranks launch the same number of forwards (a rank without a plan launches IDLE), that
the i-th launch of every rank carries the same per-DP-rank token counts and that they are the launched batches'
own, that IDLE launches are never sampled, that every request gets exactly the tokens the fake model gives it
alone (through chunked prefill, mixed steps, retraction and the overlap schedule), and that the ranks report all-idle
together."""

from __future__ import annotations

import threading

import pytest

from radixlm.config import ServerArgs
from radixlm.core import Req
from radixlm.scheduler import Scheduler
from radixlm.scheduler.dp_lockstep import DPLockstep

from fake_executor import FakeWorker, check_memory
from test_scheduler_model_free import alone, req


class ThreadGather:
    """An all-gather among ``n`` threads (one per DP rank, attention groups of one rank)."""

    def __init__(self, n: int) -> None:
        self.barrier = threading.Barrier(n, timeout=20)
        self.slots: list[list[int] | None] = [None] * n

    def for_rank(self, rank: int):
        def gather(values: list[int]) -> list[list[int]]:
            self.slots[rank] = list(values)
            self.barrier.wait()
            rows = list(self.slots)
            self.barrier.wait()  # nobody writes the next round before everyone has read this one
            return rows
        return gather


class CountingWorker(FakeWorker):
    """Counts ``sample`` calls per launched batch mode."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sampled_modes: list = []

    def sample(self, launch, grammar_mask=None):
        self.sampled_modes.append(launch.batch.mode)
        return super().sample(launch, grammar_mask)


# Per DP rank: (arrival iteration, prompt, new tokens).  Rank 0 has long prompts (chunked), rank 1 arrives late
# and outlives rank 0, rank 2 gets nothing.
PLANS = [
    [(0, list(range(3, 43)), 6), (0, list(range(5, 30)), 9), (4, [7, 8, 9], 3)],
    [(3, [11, 12, 13, 14], 12), (5, list(range(20, 31)), 4)],
    [],
]


def run_ranks(plans, **kwargs) -> tuple[list[Scheduler], list[CountingWorker], list[list[Req]], list[list[bool]]]:
    """Each rank steps its scheduler, adding its arrivals at their iteration, until all ranks are idle together.
    Returns the schedulers, workers, requests and, per rank, its ``may_wait_for_requests`` after every step."""
    n = len(plans)
    gather = ThreadGather(n)
    max_total_tokens = kwargs.pop("max_total_tokens", 512)
    scheds, workers = [], []
    for rank in range(n):
        worker = CountingWorker(max_total_tokens)
        args = ServerArgs(device="cpu", grammar_backend="none", max_total_tokens=max_total_tokens, random_seed=0,
                          attention_backend="torch_native", **kwargs)
        scheds.append(Scheduler(args, worker, DPLockstep(rank, n, 1, gather.for_rank(rank))))
        workers.append(worker)
    reqs = [[req(f"{rank}-{i}", prompt, new) for i, (_, prompt, new) in enumerate(plan)]
            for rank, plan in enumerate(plans)]
    waits: list[list[bool]] = [[] for _ in range(n)]
    errors: list[BaseException] = []

    def body(rank: int) -> None:
        try:
            sched = scheds[rank]
            for it in range(2000):
                for (arrival, _, _), r in zip(plans[rank], reqs[rank]):
                    if arrival == it:
                        sched.add_request(r)
                sched.step()
                check_memory(sched)
                waits[rank].append(sched.may_wait_for_requests())
                if it > max((a for plan in plans for a, _, _ in plan), default=0) and sched.lockstep.all_idle:
                    return
            raise AssertionError("the ranks did not finish")
        except BaseException as e:  # noqa: BLE001 -- reported by the main thread
            errors.append(e)
            gather.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return scheds, workers, reqs, waits


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(disable_overlap_schedule=True),
    dict(chunked_prefill_size=8),
    dict(chunked_prefill_size=8, enable_mixed_chunk=True),
    dict(max_total_tokens=48, chunked_prefill_size=16, schedule_conservativeness=0.3),  # retraction on rank 0
])
def test_ranks_launch_together_and_get_their_tokens(kwargs):
    scheds, workers, reqs, waits = run_ranks(PLANS, **kwargs)
    launches = [w.batches for w in workers]
    assert len({len(b) for b in launches}) == 1, "every rank launches every forward"
    for step in zip(*launches):
        counts = [b.num_tokens for b in step]
        assert any(counts), "a forward runs only when some rank has tokens"
        assert all(b.dp_token_counts == counts for b in step)
        # graphs replay on every rank or none: all of this step's batches are decodes or IDLE
        assert all(b.dp_all_decode == all(x.graph_compatible for x in step) for b in step)
        assert all(b.mode.is_idle == (b.num_tokens == 0) for b in step)
    assert {b.dp_all_decode for step in zip(*launches) for b in step} == {False, True}
    assert all(b.mode.is_idle for b in launches[2]), "rank 2 only ever idles"
    for worker in workers:
        assert not any(m.is_idle for m in worker.sampled_modes), "IDLE launches are never sampled"
    for plan, rank_reqs in zip(PLANS, reqs):
        for (_, prompt, new), r in zip(plan, rank_reqs):
            assert r.output_ids == alone(prompt, new), r.rid
    # an idle rank (rank 2 throughout) may block on its socket only when every rank is idle: the ranks agree
    assert waits[0] == waits[1] == waits[2]
    assert waits[0][-1] and not any(waits[0][:-1])
    if "max_total_tokens" in kwargs:
        assert scheds[0].decode.num_retracted > 0
    if kwargs.get("disable_overlap_schedule"):
        assert all(sum(1 for b in launches[r] if not b.mode.is_idle) ==
                   len(workers[r].sampled_modes) for r in range(3))


def test_no_forward_while_every_rank_is_idle():
    """Ranks with nothing to do exchange their plans but launch nothing."""
    scheds, workers, _, waits = run_ranks([[], []])
    assert all(w.batches == [] for w in workers)
    assert all(w == [True, True] for w in waits)
