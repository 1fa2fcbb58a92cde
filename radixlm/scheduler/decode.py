"""The running batch: requests in state DECODING, their room in the KV pool, and retraction when it runs out."""

from __future__ import annotations

import logging

from radixlm.cache import RadixCache
from radixlm.config import ServerArgs
from radixlm.core import Req, ReqState, new_epoch
from radixlm.mem import KVMemory

logger = logging.getLogger(__name__)


class DecodeManager:
    """Owns ``running`` (in row order) and the fraction of future decode tokens that admission reserves.

    ``epoch`` names the current row order for the executor's sampling state; every change of ``running``
    goes through ``add``/``remove`` and starts a new one.
    """

    def __init__(self, args: ServerArgs, memory: KVMemory, tree_cache: RadixCache) -> None:
        self.memory = memory
        self.tree_cache = tree_cache
        self.running: list[Req] = []
        self._epoch: int | None = None
        # Fraction of each request's remaining max_new_tokens reserved at admission; decays while decoding goes
        # well, jumps back after a retraction.
        self.init_new_token_ratio = min(0.7 * args.schedule_conservativeness, 1.0)
        self.min_new_token_ratio = self.init_new_token_ratio * 0.14
        self.new_token_ratio_decay = (self.init_new_token_ratio - self.min_new_token_ratio) / 600
        self.new_token_ratio = self.init_new_token_ratio
        self.num_retracted = 0

    @property
    def epoch(self) -> int:
        if self._epoch is None:
            self._epoch = new_epoch()
        return self._epoch

    def add(self, req: Req) -> None:
        req.move_to(ReqState.DECODING)
        self.running.append(req)
        self._epoch = None

    def remove(self, reqs: list[Req]) -> None:
        gone = set(map(id, reqs))
        if any(id(r) in gone for r in self.running):
            self.running = [r for r in self.running if id(r) not in gone]
            self._epoch = None

    def slots_needed(self) -> int:
        """KV slots the next decode step allocates: a fresh page for each request whose last page is full."""
        page = self.memory.page_size
        return sum(1 for r in self.running if r.kv_len % page == 0) * page

    def has_room(self) -> bool:
        return self.memory.allocator.available_size() >= self.slots_needed()

    def make_room(self, waiting: list[Req]) -> None:
        """Every running request needs one KV slot: evict cached prefixes, then retract requests if needed (the
        retracted go to the front of ``waiting``)."""
        allocator = self.memory.allocator
        while self.running and not self.has_room():
            self.tree_cache.evict(self.slots_needed() - allocator.available_size())
            if self.has_room():
                break
            self.retract_one(waiting)

    def retract_one(self, waiting: list[Req]) -> None:
        """Send the request with the least progress back to the waiting queue (its KV goes to the cache); its
        outputs stay, and sampling is keyed by (seed, output position), so it resumes with the same tokens."""
        victim = min(self.running, key=lambda r: (len(r.output_ids), -len(r.origin_input_ids)))
        self.remove([victim])
        self.tree_cache.cache_finished_req(victim)
        victim.reset_for_retraction()
        victim.move_to(ReqState.WAITING)
        waiting.insert(0, victim)
        self.num_retracted += 1
        self.new_token_ratio = 1.0
        logger.info("retracted request %s (%d tokens out); KV pool full", victim.rid, len(victim.output_ids))

    def decay_reserve(self) -> None:
        """One decode step went through without retraction: reserve a little less for future tokens."""
        self.new_token_ratio = max(self.new_token_ratio - self.new_token_ratio_decay, self.min_new_token_ratio)
