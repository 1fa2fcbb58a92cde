"""Launch tables for tuning runs: a JSON file named by an environment variable maps a shape key
(``"A,B,..."``) to a kernel's launch parameters (``[values]``), as the sweeps under ``bench/gpu/`` write them.
Kernels read theirs once (CUDA graphs capture what it names) and fall back to their built-in defaults."""

from __future__ import annotations

import json
import os


def read_launch_table(env_var: str) -> dict[tuple[str, ...], list[int]]:
    """The table in the file named by ``env_var``, keys split at commas; {} when the variable is unset."""
    path = os.environ.get(env_var)
    if not path:
        return {}
    with open(path) as f:
        return {tuple(key.split(",")): values for key, values in json.load(f).items()}


def write_launch_table(path: str, table: dict[str, list[int]]) -> None:
    """Write ``table`` (``{"A,B,...": [values]}``) where ``read_launch_table`` reads it, and say so."""
    with open(path, "w") as f:
        json.dump(table, f, indent=1)
    print(f"wrote {path}: {table}")
