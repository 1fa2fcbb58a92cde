"""The package layering (low to high: kernels/layers/mem/cache/sampling/config -> models/attention -> executor ->
scheduler -> engine -> server): a lower layer never imports a higher one; the router (its own process) imports none of
them.  Each check runs in a fresh interpreter, so that nothing this test session imported earlier hides an import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HIGHER_THAN_CONFIG = ["radixlm.kernels.cpu", "radixlm.models", "radixlm.executor", "radixlm.scheduler",
                      "radixlm.engine", "radixlm.server"]


def modules_loaded_by(code: str) -> set[str]:
    """The radixlm modules imported after running ``code`` in a fresh interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in sys.modules if m.startswith('radixlm'))))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    return set(json.loads(out.stdout.splitlines()[-1]))


def under(loaded: set[str], packages: list[str]) -> list[str]:
    return sorted(m for m in loaded if any(m == p or m.startswith(p + ".") for p in packages))


@pytest.mark.parametrize("code", [
    "import radixlm.config",
    # Building a ServerArgs resolves --attention-backend auto without loading (or compiling) the C kernels.
    "from radixlm.config import ServerArgs\nServerArgs(device='cpu')",
])
def test_config_imports_no_higher_layer(code: str) -> None:
    assert under(modules_loaded_by(code), HIGHER_THAN_CONFIG) == []


def test_cpu_kernels_do_not_import_models() -> None:
    """Neither importing the C kernels nor building and loading them (their cache dir included) imports models."""
    loaded = modules_loaded_by("import radixlm.kernels.cpu as cpu\ncpu.available()")
    assert under(loaded, ["radixlm.models"]) == []


@pytest.mark.parametrize("code, higher", [
    # model-free: the scheduler loads no model code at all, only the contract in core
    ("import radixlm.scheduler", ["radixlm.executor", "radixlm.models", "radixlm.layers", "radixlm.attention",
                                  "radixlm.kernels", "radixlm.engine", "radixlm.server"]),
    ("import radixlm.executor", ["radixlm.scheduler", "radixlm.engine", "radixlm.server"]),
    ("import radixlm.core, radixlm.mem, radixlm.cache, radixlm.sampling",
     ["radixlm.models", "radixlm.attention", "radixlm.executor", "radixlm.scheduler", "radixlm.engine"]),
])
def test_core_layers_import_no_higher_layer(code: str, higher: list[str]) -> None:
    """The scheduler speaks to the executor through core's Batch and reports through its own stats, never
    through the engine's messages; the executor never reaches the scheduler; the shared vocabulary and the
    memory, cache and sampling packages sit below the model code."""
    assert under(modules_loaded_by(code), higher) == []


def test_router_imports_only_itself() -> None:
    """The router is its own light process: its policies, HTTP app and command load none of the engine's packages,
    nor torch; only what the HTTP servers share (the error object, the API-key middleware)."""
    loaded = modules_loaded_by("import radixlm.router, radixlm.router.server, radixlm.router.launch\nimport sys\n"
                               "assert 'torch' not in sys.modules")
    shared = {"radixlm", "radixlm.errors", "radixlm.server", "radixlm.server.auth"}
    assert sorted(m for m in loaded if m not in shared and not m.startswith("radixlm.router")) == []
