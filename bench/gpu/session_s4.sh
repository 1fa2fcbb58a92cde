#!/usr/bin/env bash
# GPU run S4 (one H200, ~3 minutes; issue #19): the Gluon prototype of the batch-1 FP8 GEMV with 2-4 K tiles (16-32
# KB of weight) a ring slot, one barrier wait and one refill per slot, against one tile a slot (S1-S3: a program
# streamed ~34 GB/s however many slots) and the served Triton GEMV.
#   bash bench/gpu/session_s4.sh      (GPU machine, repository root; carry .whl)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 420 python3 bench/gpu/gluon_gemv.py 2>&1 | quiet | tee $LOG/gluon_gemv_s4.txt
