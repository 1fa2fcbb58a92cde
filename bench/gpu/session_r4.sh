#!/usr/bin/env bash
# GPU run R4 (one H200, ~3 minutes; issue #19): R3 found the norms without FP contraction no better (the one-chunk
# per-token norm then differed in 2304-wide fp32 rows too), so contraction is back, and a per-token norm program
# takes at most half its row's block (fused_quant._split): the norm and quantizer tests on CUDA at the served
# chunk and at 16384, and the fused FP8 models.
#   bash bench/gpu/session_r4.sh      (GPU machine, repository root; carry .whl)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/unit/test_fused_quant.py tests/unit/test_fused_ops.py \
  tests/parity/test_fp8_fused.py 2>&1 | quiet > $LOG/tests.txt
grep -E "^FAILED|^E  .*differ" $LOG/tests.txt | head -12; tail -1 $LOG/tests.txt
