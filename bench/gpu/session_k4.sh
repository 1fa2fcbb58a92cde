#!/usr/bin/env bash
# GPU run K4 (one H200, ~4 minutes): K3's tests again with the online-FP8 linear's reference fixed (grouped
# decode activations) and only their summaries printed.
#   bash bench/gpu/session_k4.sh     (GPU machine, repository root; carry .whl and .carry)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
for t in tests/unit/test_fp8_kernels.py tests/unit/test_fused_quant.py tests/parity/test_fp8_fused.py \
  tests/parity/test_fp8.py tests/parity/test_fp8_kv.py; do
  echo "-- $t"; timeout 150 python3 -m pytest -q -p no:cacheprovider $t 2>&1 | quiet | grep -E "passed|failed|^FAILED" | head -12
done
