#!/usr/bin/env bash
# GPU run M5 (one H200, ~2 minutes): the dense decode expand's launch sweep (rank-16 pool, 1 / 32 / 128 rows).
#   bash bench/gpu/session_m5.sh     (GPU machine, repository root; carry .whl and .carry)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 300 python3 bench/gpu/lora_tune.py --dense --ranks 16 --max-rank 16 --tokens 1 32 128 2>&1 | quiet | tail -14
