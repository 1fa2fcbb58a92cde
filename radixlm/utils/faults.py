"""Injected faults: a test hook that makes a named place in the engine fail on purpose.

Not for production.  The fault-isolation tests start a server with the environment variable ``RADIXLM_FAULTS`` set
and check that the failure surfaces the way it must (a 500 with a logged traceback, one request failed and its
neighbours untouched, a watchdog exit) instead of a hang.  The variable is read once, when this module is imported;
unset (the normal case) ``ACTIVE`` is None and every fault point costs one module attribute test::

    if faults.ACTIVE is not None:
        faults.ACTIVE.fire("scheduler.step", rids)

Syntax: faults separated by commas, each ``SITE=ACTION`` or ``SITE=ACTION@RID_PREFIX``:

- ``SITE``: where it fires, one of ``SITES``: ``scheduler.step`` (the scheduler loop, just before a step runs the
  model; the requests in the scheduler are the step's) and ``detokenizer`` (the front end, delivering one request's
  new tokens: detokenization, stop strings, the chunk to the consumer).
- ``ACTION``: ``raise`` (an ``InjectedFault``, a RuntimeError) or ``hang`` (sleep for good: what a stuck forward
  looks like to the watchdog).
- ``@RID_PREFIX``: fire only while a request whose rid starts with it is at that site; without it, whenever any
  request is.  A site is never passed when no request is there (an idle scheduler loop), so a fault never fires at
  startup.  A test picks one request to fail among several by giving it such a rid.

Example: ``RADIXLM_FAULTS="scheduler.step=raise@crash-,detokenizer=raise@bad-"``.  A malformed value raises
``ValueError`` at import, so a typo fails the server's start instead of silently testing nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

ENV_VAR = "RADIXLM_FAULTS"
SITES = ("scheduler.step", "detokenizer")
ACTIONS = ("raise", "hang")


class InjectedFault(RuntimeError):
    """Raised by a ``raise`` fault."""


@dataclass(frozen=True)
class Fault:
    site: str
    action: str
    rid_prefix: str = ""  # empty: any request

    def matches(self, rids: Iterable[str]) -> bool:
        return any(rid.startswith(self.rid_prefix) for rid in rids)


class Faults:
    """The parsed ``RADIXLM_FAULTS``."""

    def __init__(self, spec: str) -> None:
        self.faults: list[Fault] = []
        for item in filter(None, (part.strip() for part in spec.split(","))):
            site, eq, rest = item.partition("=")
            action, _, prefix = rest.partition("@")
            site, action = site.strip(), action.strip()
            if not eq or site not in SITES or action not in ACTIONS:
                raise ValueError(f"{ENV_VAR}: {item!r} is not SITE=ACTION[@RID_PREFIX] with SITE one of "
                                 f"{', '.join(SITES)} and ACTION one of {', '.join(ACTIONS)}")
            self.faults.append(Fault(site, action, prefix.strip()))

    def fire(self, site: str, rids: Iterable[str]) -> None:
        """Act out the first fault of ``site`` that matches one of ``rids`` (the requests at that site now)."""
        rids = list(rids)
        for fault in self.faults:
            if fault.site == site and fault.matches(rids):
                if fault.action == "hang":
                    while True:
                        time.sleep(3600)
                raise InjectedFault(f"injected fault at {site} ({ENV_VAR})")


def _from_environment() -> Faults | None:
    spec = os.environ.get(ENV_VAR, "").strip()
    return Faults(spec) if spec else None


ACTIVE: Faults | None = _from_environment()

__all__ = ["ACTIVE", "ENV_VAR", "Fault", "Faults", "InjectedFault"]
