#!/usr/bin/env bash
# GPU run S3 (one H200, ~3 minutes; issue #19): the batch-1 FP8 GEMV, served Triton and the Gluon prototype, with
# the weight stored as in the checkpoint and stored tile by tile (`fp8_gemv.tile_weight`: each 64 x 128 tile's
# 8 KB contiguous, so that a program's K walk reads one contiguous stream instead of 64 rows 128 bytes at a time).
#   bash bench/gpu/session_s3.sh      (GPU machine, repository root; carry .whl)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 420 python3 bench/gpu/gluon_gemv.py 2>&1 | quiet | tee $LOG/gluon_gemv_s3.txt
