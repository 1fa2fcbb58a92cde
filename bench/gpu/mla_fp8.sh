#!/usr/bin/env bash
# Issue #19, point 4, on one H200 (~8 minutes; split at the marked line into two calls if need be): the FP8 MLA
# absorbed products (--enable-fp8-mla-bmm).  The kernel tests compiled (DeepSeek-V3 shapes, CUDA-graph replay, the
# fused rounding against torch's) and the tiny MLA model with the flag on CUDA (decode in CUDA graphs); then the
# absorbed products timed, bf16 torch.bmm vs the FP8 kernel, with a config sweep (bench/gpu/mla.py part d); then
# the flag's accuracy on dummy-weight DeepSeek-V2-Lite (whole) and DeepSeek-V3 (first 5 layers: 3 dense, 2 MoE).
#   bash bench/gpu/mla_fp8.sh     (GPU machine, repository root; wheels in .whl)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
start=$(date +%s)
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/unit/test_fp8_bmm.py tests/parity/test_mla_fp8_bmm.py \
  -k "not parity or cuda" 2>&1 | quiet | tee $LOG/mla_fp8_tests.txt | tail -8
timeout 300 python3 bench/gpu/mla.py --parts d --tune 2>&1 | quiet | tee $LOG/mla_fp8_bmm_timing.txt
# ---- second call from here if the first ran long
timeout 200 python3 bench/mla_fp8_bmm_accuracy.py --device cuda --dtype bfloat16 --model-path deepseek-v2-lite \
  --load-format dummy 2>&1 | quiet | tee $LOG/mla_fp8_accuracy_v2lite.txt | tail -5
timeout 250 python3 bench/mla_fp8_bmm_accuracy.py --device cuda --dtype bfloat16 --model-path deepseek-v3 \
  --load-format dummy --json-model-override-args '{"num_hidden_layers": 5}' 2>&1 | quiet \
  | tee $LOG/mla_fp8_accuracy_v3.txt | tail -5
echo "total $(( $(date +%s) - start )) s"
