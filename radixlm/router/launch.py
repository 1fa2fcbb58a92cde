"""``radixlm router``: the router process's flags (SGLang's names, into ``RouterArgs``) and its serving loop.
Imports no engine package nor torch, so that the router starts in a second and stays small.

The routing flags are also ``radixlm serve``'s, prefixed ``--router-`` (as in SGLang's ``sglang_router.launch_server``),
for the router in front of ``--dp-size`` replicas (radixlm.server.replicas)."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

from radixlm.router.policy import POLICIES, RouterArgs
from radixlm.router.workers import HealthChecks

DEFAULTS = RouterArgs()
SERVE_PREFIX = "router-"  # the routing flags' prefix on `radixlm serve`


@dataclass(frozen=True)
class RouterOptions:
    """What the router process takes besides ``RouterArgs``: further workers tried after a failed try, and how
    workers are health-checked."""

    retries: int = 2
    health: HealthChecks = HealthChecks()


def add_cli_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, prefix: str = "") -> None:
    """The routing flags, ``--{prefix}policy`` and so on (``radixlm router``: no prefix, plus ``add_endpoint_args``)."""
    def flag(name: str, **kwargs) -> None:
        parser.add_argument(f"--{prefix}{name}", dest=(prefix + name).replace("-", "_"), **kwargs)

    flag("policy", choices=POLICIES, default=DEFAULTS.policy, help="how a request's worker is chosen")
    flag("cache-threshold", type=float, default=DEFAULTS.cache_threshold,
         help="cache_aware: the matched share of a request's text above which it goes to the worker holding the match")
    flag("balance-abs-threshold", type=int, default=DEFAULTS.balance_abs_threshold,
         help=f"cache_aware: with --{prefix}balance-rel-threshold, the load spread past which the least loaded "
              "worker is chosen")
    flag("balance-rel-threshold", type=float, default=DEFAULTS.balance_rel_threshold)
    flag("eviction-interval-secs", type=float, default=DEFAULTS.eviction_interval_secs)
    flag("max-tree-size", type=int, default=DEFAULTS.max_tree_size,
         help="cache_aware: characters per worker the prefix tree keeps after an eviction")
    flag("retry-max-retries", type=int, default=RouterOptions.retries,
         help="further workers tried when a try fails before the response starts")
    flag("health-check-interval-secs", type=float, default=HealthChecks.interval_secs,
         help="seconds between two GET /health of each worker")
    flag("health-check-timeout-secs", type=float, default=HealthChecks.timeout_secs,
         help="a health check not answered 200 within this fails")
    flag("health-failure-threshold", type=int, default=HealthChecks.failure_threshold,
         help="consecutive failed health checks before a worker leaves the candidates")
    flag("health-success-threshold", type=int, default=HealthChecks.success_threshold,
         help="consecutive passing health checks before a worker that left comes back (a new worker joins at its "
              "first)")


def add_endpoint_args(parser: argparse.ArgumentParser) -> None:
    """``radixlm router``'s own flags: its workers, address, key and log level (``radixlm serve`` has these)."""
    parser.add_argument("--worker-urls", nargs="*", default=[], metavar="URL",
                        help="the workers (http://host:port), in order; more join with POST /add_worker?url=")
    parser.add_argument("--host", default=DEFAULTS.host)
    parser.add_argument("--port", type=int, default=DEFAULTS.port)
    parser.add_argument("--api-key", default=None,
                        help="required from clients (Authorization: Bearer) and sent to the workers")
    parser.add_argument("--log-level", default="info")


def router_args(ns: argparse.Namespace, prefix: str = "", *, worker_urls: tuple[str, ...] | list[str],
                host: str, port: int, api_key: str | None) -> RouterArgs:
    """The ``RouterArgs`` of parsed ``add_cli_args(prefix)`` flags and the given endpoint; ValueError names the
    flags that are wrong."""
    def value(name: str):
        return getattr(ns, prefix.replace("-", "_") + name)

    return RouterArgs(worker_urls=tuple(worker_urls), policy=value("policy"), cache_threshold=value("cache_threshold"),
                      balance_abs_threshold=value("balance_abs_threshold"),
                      balance_rel_threshold=value("balance_rel_threshold"),
                      eviction_interval_secs=value("eviction_interval_secs"), max_tree_size=value("max_tree_size"),
                      host=host, port=port, api_key=api_key)


def router_options(ns: argparse.Namespace, prefix: str = "") -> RouterOptions:
    """The ``RouterOptions`` of parsed ``add_cli_args(prefix)`` flags; ValueError when one is out of range."""
    def value(name: str):
        return getattr(ns, prefix.replace("-", "_") + name)

    if value("retry_max_retries") < 0:
        raise ValueError(f"--{prefix}retry-max-retries must be >= 0")
    try:
        health = HealthChecks(interval_secs=value("health_check_interval_secs"),
                              timeout_secs=value("health_check_timeout_secs"),
                              failure_threshold=value("health_failure_threshold"),
                              success_threshold=value("health_success_threshold"))
    except ValueError as exc:
        raise ValueError(f"--{prefix}health-*: {exc}") from None
    return RouterOptions(value("retry_max_retries"), health)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="radixlm router",
                                     description="route requests across radixlm workers (data parallelism)")
    add_endpoint_args(parser)
    add_cli_args(parser)
    ns = parser.parse_args(argv)
    try:
        args = router_args(ns, worker_urls=ns.worker_urls, host=ns.host, port=ns.port, api_key=ns.api_key)
        options = router_options(ns)
    except ValueError as exc:
        parser.error(str(exc))
    import uvicorn

    from radixlm.router.server import create_router_app

    logging.basicConfig(level=ns.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_router_app(args, retries=options.retries, health=options.health)
    uvicorn.run(app, host=args.host, port=args.port, log_level=ns.log_level, access_log=False)
    return 0
