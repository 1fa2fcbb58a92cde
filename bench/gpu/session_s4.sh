#!/usr/bin/env bash
# GPU run S4 (one H200, ~4 minutes; issue #19): (1) the Gluon prototype of the batch-1 FP8 GEMV with 2-4 K tiles
# (16-32 KB of weight) a ring slot, one barrier wait and one refill per slot, against one tile a slot (S1-S3: a
# program streamed ~34 GB/s however many slots) and the served Triton GEMV; (2) gate_up then down in one
# persistent launch (bench/gpu/gluon_persistent.py) against the two GEMVs back to back.
#   bash bench/gpu/session_s4.sh      (GPU machine, repository root; carry .whl)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 150 python3 bench/gpu/gluon_persistent.py 2>&1 | quiet | tee $LOG/gluon_persistent_s4.txt
timeout 300 python3 bench/gpu/gluon_gemv.py 2>&1 | quiet | tee $LOG/gluon_gemv_s4.txt
