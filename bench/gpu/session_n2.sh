#!/usr/bin/env bash
# GPU run N2 (one H200, ~6 minutes): the dense LoRA decode expands with several column tiles a program, their
# loads pipelined (N_TILES / NUM_STAGES): GPU tests, the sweep (bench/gpu/lora_tune.py --dense: 1 row and 128
# rows / 16 adapters, rank 16) writing $OUT/expand.json, then Llama-3.1-8B decode at batch 32 and 128 with 16
# rank-16 adapters against LoRA off with the defaults, and with RADIXLM_LORA_EXPAND_CONFIGS=that file.
#   bash bench/gpu/session_n2.sh     (GPU machine, repository root; carry .whl and .carry)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/unit/test_lora_kernels.py tests/unit/test_cuda_graph.py \
  tests/unit/test_fp8_kernels.py::test_gemv_config_overrides \
  -k "lora or Lora or LoRA or dense or expand or overrides" 2>&1 | quiet | grep -E "passed|failed|^FAILED|^E  " | head -12
timeout 200 python3 bench/gpu/lora_tune.py --dense --ranks 16 --max-rank 16 --tokens 1 128 \
  --write-configs $LOG/expand.json 2>&1 | quiet | tail -12
echo "-- defaults"
lora_e2e 150 --ranks 16 --batch-size 32 128 --num-adapters 0 16 | tail -7
[ -s $LOG/expand.json ] && { echo "-- swept expand launches";
  RADIXLM_LORA_EXPAND_CONFIGS=$LOG/expand.json lora_e2e 150 --ranks 16 --batch-size 32 128 --num-adapters 0 16 \
  | tail -7; }
