"""The router's worker set: the configured workers in order, which of them are healthy, and the outstanding
requests of each (the ``loads`` a routing policy sees).

Single-threaded: every method runs on the router's asyncio loop.  Health (``HealthChecks``, SGLang's router's
flags and defaults): a worker joins the candidates at its first passing check; a healthy worker leaves them after
``failure_threshold`` consecutive failed checks (one slow answer does not drop it), or at once when it refuses a
forwarded request's connection; a worker that left comes back after ``success_threshold`` consecutive passing
checks (a flapping worker does not take traffic at its first answer).  The policy forgets a worker that leaves
(``policy.remove_worker``).  Outstanding counts are per worker, incremented when a request is
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


@dataclass(frozen=True)
class HealthChecks:
    """How workers are checked: ``GET /health`` every ``interval_secs``, failed past ``timeout_secs``."""

    interval_secs: float = 5.0
    timeout_secs: float = 5.0
    failure_threshold: int = 3  # consecutive failed checks before a healthy worker leaves the candidates
    success_threshold: int = 2  # consecutive passing checks before a worker that left comes back

    def __post_init__(self) -> None:
        if self.interval_secs <= 0 or self.timeout_secs <= 0:
            raise ValueError("the health check interval and timeout must be > 0")
        if self.failure_threshold < 1 or self.success_threshold < 1:
            raise ValueError("the health failure and success thresholds must be >= 1")


@dataclass
class Worker:
    url: str
    healthy: bool = False
    outstanding: int = 0
    was_healthy: bool = False  # once healthy, coming back takes success_threshold passing checks
    streak: int = 0  # consecutive checks (passing if > 0, failed if < 0) since the last change


class WorkerSet:
    """The workers, in the order they were added (the order ``loads`` gives the policy)."""

    def __init__(self, urls: tuple[str, ...], policy: RoutingPolicy, health: HealthChecks = HealthChecks()) -> None:
        self.policy = policy
        self.health = health
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
        """Mark the worker at once (a refused connection: unhealthy without waiting for the threshold)."""
        worker = self._workers.get(url)
        if worker is None or worker.healthy == healthy:
            return
        worker.healthy = healthy
        worker.streak = 0
        if healthy:
            worker.was_healthy = True
            logger.info("worker %s is healthy: back among the candidates", url)
        else:
            logger.warning("worker %s is unhealthy: out of the candidates until it passes a health check", url)
            self.policy.remove_worker(url)

    def checked(self, url: str, passed: bool) -> None:
        """Count one health check's result; the worker changes state when its streak reaches the threshold."""
        worker = self._workers.get(url)
        if worker is None:
            return
        if passed:
            worker.streak = max(worker.streak, 0) + 1
            needed = self.health.success_threshold if worker.was_healthy else 1
            if not worker.healthy and worker.streak >= needed:
                self.set_healthy(url, True)
        else:
            worker.streak = min(worker.streak, 0) - 1
            if worker.healthy and -worker.streak >= self.health.failure_threshold:
                self.set_healthy(url, False)

    def started(self, url: str) -> None:
        self._workers[url].outstanding += 1

    def finished(self, url: str) -> None:
        worker = self._workers.get(url)
        if worker is not None:
            worker.outstanding -= 1

    async def check(self, session: aiohttp.ClientSession, url: str) -> bool:
        """GET ``url``/health: passed on a 200 within the timeout; counted by ``checked``.  Whether it passed."""
        timeout = aiohttp.ClientTimeout(total=self.health.timeout_secs)
        try:
            async with session.get(url + "/health", timeout=timeout) as response:
                passed = response.status == 200
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
            passed = False
        self.checked(url, passed)
        return passed

    async def check_all(self, session: aiohttp.ClientSession) -> None:
        await asyncio.gather(*(self.check(session, w.url) for w in self.all()))

    async def health_loop(self, session: aiohttp.ClientSession) -> None:
        """Check every worker every ``interval_secs``, forever (cancelled at shutdown)."""
        while True:
            await asyncio.sleep(self.health.interval_secs)
            await self.check_all(session)


def normalize_url(url: str) -> str:
    """``host:port`` or ``http://host:port/`` -> ``http://host:port`` (the key workers are known by)."""
    url = url.strip().rstrip("/")
    return url if "://" in url else "http://" + url
