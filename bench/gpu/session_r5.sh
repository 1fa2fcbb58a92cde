#!/usr/bin/env bash
# GPU run R5 (one H200, ~5 minutes; issues #19, #20): this session's code as it stands, on CUDA: the FP8 models
# against HF, the FP8 kernels, the fused quantizers, CUDA graphs, and DP attention in one process.
#   bash bench/gpu/session_r5.sh      (GPU machine, repository root; carry .whl)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 420 python3 -m pytest -q -p no:cacheprovider tests/parity/test_fp8.py tests/parity/test_fp8_fused.py \
  tests/unit/test_fp8_kernels.py tests/unit/test_fused_quant.py tests/unit/test_cuda_graph.py \
  tests/parity/test_dp_attention.py 2>&1 | quiet > $LOG/tests.txt
grep -E "^FAILED|^ERROR" $LOG/tests.txt | head -12; tail -1 $LOG/tests.txt
