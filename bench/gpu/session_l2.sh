#!/usr/bin/env bash
# GPU run L2 (one H200, ~6 minutes): the tests, the per-projection cost table and the tile sweep again, after the
# split-K rule and GEMV warps were retuned from L1 and with the expand walking chunks of N tiles (since dropped:
# slower; see docs/benchmarks.md).
#   bash bench/gpu/session_l2.sh     (GPU machine, repository root; carry .whl and .carry)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/unit/test_lora_kernels.py 2>&1 | quiet \
  | grep -E "passed|failed|^FAILED|^E  " | head -12
timeout 150 python3 bench/gpu/lora_kernels.py --shapes qkv gate_up o down --ranks 16 64 --tokens 1 32 128 \
  --adapters 1 16 2>&1 | quiet | grep -v "^\s*$" | head -70
timeout 420 python3 bench/gpu/lora_tune.py 2>&1 | quiet | grep -v "^\s*$" | head -50
