#!/usr/bin/env bash
# GPU run S2 (one H200, ~3 minutes; issue #19): the Gluon prototype, its activation scales in shared memory (S1 loaded one per K tile from global memory: 27 GB/s a program), of the batch-1 FP8 GEMV (TMA ring, one
# mbarrier a slot, weight tiles requested before the PDL wait) against the served Triton GEMV, per launch config,
# at Llama-3.1-8B's four projections.
#   bash bench/gpu/session_s2.sh      (GPU machine, repository root; carry .whl)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 480 python3 bench/gpu/gluon_gemv.py 2>&1 | quiet | tee $LOG/gluon_gemv_s2.txt
