#!/usr/bin/env bash
# GPU run S5 (one H200, ~3 minutes; issue #19): the Gluon batch-1 FP8 GEMV with its ring fed by a producer warp
# (warp specialization) against S4's best single-warp-group configs and the served Triton GEMV.
#   bash bench/gpu/session_s5.sh      (GPU machine, repository root; carry .whl)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 420 python3 bench/gpu/gluon_gemv.py 2>&1 | quiet | tee $LOG/gluon_gemv_s5.txt
