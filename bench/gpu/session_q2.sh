#!/usr/bin/env bash
# GPU run Q2 (one H200, ~3 minutes; issues #19, #20): after the CUDA graph runner learned DP attention's padded
# replay (a238468): the one-GPU graph tests and Llama-3.1-8B batch-1 decode (online FP8, bf16) as a regression
# check.  The DP graphs themselves need 4 GPUs (tests/parity/test_dp_attention.py's CUDA case).
#   bash bench/gpu/session_q2.sh      (GPU machine, repository root; carry .whl, .carry)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/unit/test_cuda_graph.py tests/parity/test_fp8_fused.py \
  tests/parity/test_dp_attention.py tests/parity/test_forward_modes.py 2>&1 | quiet > $LOG/tests.txt
grep -E "^FAILED|^E  " $LOG/tests.txt | head -12; tail -1 $LOG/tests.txt
llama_batch1 --quantization fp8
llama_batch1
