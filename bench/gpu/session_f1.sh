#!/usr/bin/env bash
# GPU run F, part 1 (one H200): issue #18's MoE kernels.  The fused-MoE and routing kernels' tests at real shapes
# and in CUDA graphs, the four MoE architectures against HF on CUDA (Triton attention, fused MoE, V3 routing
# kernel), then the fused-MoE timing table and a tuning sweep of its block sizes.
#   bash bench/gpu/session_f1.sh [t][b][u]   (GPU machine, repository root; wheels in .whl)
# t: tests, b: the timing table, u: the tuning sweep (V2-Lite and Qwen3-30B-A3B shapes); no argument runs all.
set -uo pipefail
PART=${1:-tbu}
source bench/gpu/setup.sh || exit 1
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
if [[ $PART == *t* ]]; then
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/unit/test_fused_moe.py tests/unit/test_moe_routing.py \
  tests/unit/test_moe_router.py "tests/parity/test_moe_models.py::test_moe_matches_hf" -k "not cpu" 2>&1 \
  | quiet | tee $LOG/moe_tests.txt | tail -15
fi
if [[ $PART == *b* ]]; then
timeout 200 python3 bench/gpu/fused_moe.py 2>&1 | quiet | tee $LOG/fused_moe.txt
fi
if [[ $PART == *u* ]]; then
timeout 240 python3 bench/gpu/fused_moe.py --tune --shapes deepseek-v2-lite qwen3-30b-a3b 2>&1 | quiet \
  | tee $LOG/fused_moe_tune.txt
fi
