"""``radixlm router``: the router process's flags (SGLang's names, into ``RouterArgs``) and its serving loop.
Imports no engine package nor torch, so that the router starts in a second and stays small."""

from __future__ import annotations

import argparse
import logging

from radixlm.router.policy import POLICIES, RouterArgs

DEFAULTS = RouterArgs()


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--worker-urls", nargs="*", default=[], metavar="URL",
                        help="the workers (http://host:port), in order; more join with POST /add_worker?url=")
    parser.add_argument("--policy", choices=POLICIES, default=DEFAULTS.policy)
    parser.add_argument("--cache-threshold", type=float, default=DEFAULTS.cache_threshold,
                        help="cache_aware: the matched share of a request's text above which it goes to the "
                             "worker holding the match")
    parser.add_argument("--balance-abs-threshold", type=int, default=DEFAULTS.balance_abs_threshold,
                        help="cache_aware: with --balance-rel-threshold, the load spread past which the least "
                             "loaded worker is chosen")
    parser.add_argument("--balance-rel-threshold", type=float, default=DEFAULTS.balance_rel_threshold)
    parser.add_argument("--eviction-interval-secs", type=float, default=DEFAULTS.eviction_interval_secs)
    parser.add_argument("--max-tree-size", type=int, default=DEFAULTS.max_tree_size,
                        help="cache_aware: characters per worker the prefix tree keeps after an eviction")
    parser.add_argument("--host", default=DEFAULTS.host)
    parser.add_argument("--port", type=int, default=DEFAULTS.port)
    parser.add_argument("--api-key", default=None,
                        help="required from clients (Authorization: Bearer) and sent to the workers")
    parser.add_argument("--retry-max-retries", type=int, default=2,
                        help="further workers tried when a try fails before the response starts")
    parser.add_argument("--health-check-interval-secs", type=float, default=5.0)
    parser.add_argument("--log-level", default="info")


def router_args(ns: argparse.Namespace) -> RouterArgs:
    return RouterArgs(worker_urls=tuple(ns.worker_urls), policy=ns.policy, cache_threshold=ns.cache_threshold,
                      balance_abs_threshold=ns.balance_abs_threshold, balance_rel_threshold=ns.balance_rel_threshold,
                      eviction_interval_secs=ns.eviction_interval_secs, max_tree_size=ns.max_tree_size,
                      host=ns.host, port=ns.port, api_key=ns.api_key)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="radixlm router",
                                     description="route requests across radixlm workers (data parallelism)")
    add_cli_args(parser)
    ns = parser.parse_args(argv)
    if ns.retry_max_retries < 0 or ns.health_check_interval_secs <= 0:
        parser.error("--retry-max-retries must be >= 0 and --health-check-interval-secs > 0")
    try:
        args = router_args(ns)
    except ValueError as exc:
        parser.error(str(exc))
    import uvicorn

    from radixlm.router.server import create_router_app

    logging.basicConfig(level=ns.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_router_app(args, retries=ns.retry_max_retries,
                            health_check_interval_secs=ns.health_check_interval_secs)
    uvicorn.run(app, host=args.host, port=args.port, log_level=ns.log_level, access_log=False)
    return 0
