"""The ``radixlm`` command."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["router"]:  # before the engine's flags are imported: the router process loads no torch
        from radixlm.router.launch import main as router_main

        return router_main(argv[1:])
    parser = argparse.ArgumentParser(prog="radixlm", description="radixlm: a fast LLM inference engine")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="convert the embedded model into the cache directory and print its path")
    serve = sub.add_parser("serve", help="serve a model over HTTP (OpenAI-compatible and native API)")
    generate = sub.add_parser("generate", help="generate a completion of a prompt with the offline engine")
    sub.add_parser("router", help="route requests across radixlm workers (radixlm router --help)")
    generate.add_argument("prompt", help="the prompt text")
    generate.add_argument("--max-new-tokens", type=int, default=128)
    generate.add_argument("--temperature", type=float, default=0.0)
    from radixlm.config import ServerArgs
    from radixlm.router.launch import SERVE_PREFIX, add_cli_args as add_router_cli_args

    ServerArgs.add_cli_args(serve)
    add_router_cli_args(serve.add_argument_group("router", "the router in front of --dp-size replicas (without "
                                                           "--enable-dp-attention); `radixlm router`'s flags"),
                        prefix=SERVE_PREFIX)
    ServerArgs.add_cli_args(generate)
    args = parser.parse_args(argv)
    if args.command == "prepare":
        from radixlm.models.embedded import embedded_model_path

        print(embedded_model_path())
        return 0
    if args.command == "generate":
        from radixlm.engine.engine import Engine

        server_args = ServerArgs.from_cli_args(args)
        with Engine(**vars(server_args)) as engine:
            params = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
            for chunk in engine.generate(args.prompt, params, stream=True):
                print(chunk["text"], end="", flush=True)
        print()
        return 0
    server_args = ServerArgs.from_cli_args(args)
    prefix = SERVE_PREFIX.replace("-", "_")
    router_flags = [k for k, v in vars(args).items() if k.startswith(prefix) and v != serve.get_default(k)]
    if router_flags and not server_args.dp_replicas:
        serve.error(f"--{router_flags[0].replace('_', '-')} applies to the router in front of --dp-size replicas "
                    f"(--dp-size > 1 without --enable-dp-attention)")
    if server_args.node_rank > 0:  # a multi-node server's other node: schedulers only, the HTTP server is node 0's
        from radixlm.engine.node import run_node

        logging.basicConfig(level=server_args.log_level.upper(), format="[radixlm node] %(asctime)s %(message)s")
        return run_node(server_args)
    if server_args.dp_replicas:
        from radixlm.router.launch import router_args, router_options
        from radixlm.server.replicas import serve_replicas

        try:  # the workers come from the replicas, the endpoint from --host, --port and --api-key
            router = router_args(args, SERVE_PREFIX, worker_urls=(), host=server_args.host, port=server_args.port,
                                 api_key=server_args.api_key)
            options = router_options(args, SERVE_PREFIX)
        except ValueError as exc:
            serve.error(str(exc))
        return serve_replicas(server_args, router, options)
    from radixlm.server.launch import launch_server

    return launch_server(server_args)


if __name__ == "__main__":
    sys.exit(main())
