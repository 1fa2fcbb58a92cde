"""The decode path's Triton kernels compile for sm_90 (``tests/tools/sm90_compile.py``), on machines without a
GPU too: the interpreter that runs them in CI accepts programs the compiler refuses."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "sm90_compile.py"


def test_decode_kernels_compile_for_sm90() -> None:
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the kernels' launches choose fusion where it matters
    result = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "all compiled for sm_90" in result.stdout
