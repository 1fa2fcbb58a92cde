"""The ``radixlm`` command."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="radixlm", description="radixlm: a fast LLM inference engine")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="convert the embedded model into the cache directory and print its path")
    serve = sub.add_parser("serve", help="serve a model over HTTP (OpenAI-compatible and native API)")
    from radixlm.config import ServerArgs

    ServerArgs.add_cli_args(serve)
    args = parser.parse_args(argv)
    if args.command == "prepare":
        from radixlm.models.embedded import embedded_model_path

        print(embedded_model_path())
        return 0
    ServerArgs.from_cli_args(args)  # validates the flags
    print("radixlm serve: the HTTP server is not built yet (issue #4); the engine core is usable in-process.",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
