"""The ``radixlm`` command."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="radixlm", description="radixlm: a fast LLM inference engine")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="convert the embedded model into the cache directory and print its path")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        from radixlm.models.embedded import embedded_model_path

        print(embedded_model_path())
    return 0


if __name__ == "__main__":
    sys.exit(main())
