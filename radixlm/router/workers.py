"""The router's worker set: the configured workers in order, which of them are healthy, and the outstanding
requests of each (the ``loads`` a routing policy sees).

Single-threaded: every method runs on the router's asyncio loop.  A worker that fails a health check, or refuses
a forwarded request's connection, leaves the candidate set and the policy forgets it (``policy.remove_worker``); the
next passing health check brings it back.  Outstanding counts are per worker, incremented when a request is
forwarded (``started``) and decremented when its response body has been relayed to the end or failed
(``finished``); a worker removed while requests are outstanding simply drops their count.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import aiohttp

from radixlm.router.policy import RoutingPolicy

logger = logging.getLogger(__name__)


@dataclass
class Worker:
    url: str
    healthy: bool = False
    outstanding: int = 0


class WorkerSet:
    """The workers, in the order they were added (the order ``loads`` gives the policy)."""

    def __init__(self, urls: tuple[str, ...], policy: RoutingPolicy) -> None:
        self.policy = policy
        self._workers: dict[str, Worker] = {}
        for url in urls:
            self.add(url)

    def add(self, url: str) -> bool:
        """Add an (unhealthy until checked) worker; False when it was there already."""
        url = normalize_url(url)
        if url in self._workers:
            return False
        self._workers[url] = Worker(url)
        return True

    def remove(self, url: str) -> bool:
        """Forget a worker; False when it was not there."""
        worker = self._workers.pop(normalize_url(url), None)
        if worker is None:
            return False
        self.policy.remove_worker(worker.url)
        return True

    def __contains__(self, url: str) -> bool:
        return normalize_url(url) in self._workers

    def all(self) -> list[Worker]:
        return list(self._workers.values())

    def loads(self, exclude: set[str] | frozenset[str] = frozenset()) -> dict[str, int]:
        """Outstanding requests of each healthy worker not in ``exclude``, in the workers' order."""
        return {w.url: w.outstanding for w in self._workers.values() if w.healthy and w.url not in exclude}

    def set_healthy(self, url: str, healthy: bool) -> None:
        worker = self._workers.get(url)
        if worker is None or worker.healthy == healthy:
            return
        worker.healthy = healthy
        if healthy:
            logger.info("worker %s is healthy: back among the candidates", url)
        else:
            logger.warning("worker %s is unhealthy: out of the candidates until it passes a health check", url)
            self.policy.remove_worker(url)

    def started(self, url: str) -> None:
        self._workers[url].outstanding += 1

    def finished(self, url: str) -> None:
        worker = self._workers.get(url)
        if worker is not None:
            worker.outstanding -= 1

    async def check(self, session: aiohttp.ClientSession, url: str, timeout_s: float) -> bool:
        """GET ``url``/health: healthy on a 200 within ``timeout_s``; updates the worker's state."""
        try:
            async with session.get(url + "/health", timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
                healthy = response.status == 200
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
            healthy = False
        self.set_healthy(url, healthy)
        return healthy

    async def check_all(self, session: aiohttp.ClientSession, timeout_s: float) -> None:
        await asyncio.gather(*(self.check(session, w.url, timeout_s) for w in self.all()))

    async def health_loop(self, session: aiohttp.ClientSession, interval_s: float, timeout_s: float) -> None:
        """Check every worker every ``interval_s`` seconds, forever (cancelled at shutdown)."""
        while True:
            await asyncio.sleep(interval_s)
            await self.check_all(session, timeout_s)


def normalize_url(url: str) -> str:
    """``host:port`` or ``http://host:port/`` -> ``http://host:port`` (the key workers are known by)."""
    url = url.strip().rstrip("/")
    return url if "://" in url else "http://" + url
