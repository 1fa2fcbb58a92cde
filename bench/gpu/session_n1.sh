#!/usr/bin/env bash
# GPU run N1 (one H200, ~8 minutes): (a) the LoRA kernels after their shared prologue (_segment_tile): GPU tests,
# and Llama-3.1-8B decode at batch 128, LoRA off against 16 rank-16 adapters (best of 2), the #22 goal again;
# (b) issue #19: the decode GEMV swept on its served forms (bench/gpu/fp8_gemm.py --tune-gemv, 16-128 rows a
# program, 3-6 stages, 1-8 K splits), the best per-channel config per Llama-8B shape written to $OUT/gemv.json,
# and online-FP8 batch-1 decode with the defaults against RADIXLM_GEMV_CONFIGS=that file, alternating, bf16 once.
#   bash bench/gpu/session_n1.sh     (GPU machine, repository root; carry .whl and .carry)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/unit/test_lora_kernels.py tests/unit/test_fp8_kernels.py \
  -k "lora or dense or gemv" 2>&1 | quiet | grep -E "passed|failed|^FAILED|^E  " | head -12
lora_e2e 100 --ranks 16 --num-adapters 0 16 --batch-size 128 | tail -6
timeout 200 python3 bench/gpu/fp8_gemm.py --tune-gemv --gemv-formats chan --tokens 1 --write-configs $LOG/gemv.json \
  --shapes llama8b-qkv llama8b-o llama8b-down llama8b-gate_up 2>&1 | quiet | grep -v "skipped" | head -40
ARGS="--model-path llama-3.1-8b --load-format dummy --skip-tokenizer-init --input-len 128 --output-len 64 \
  --batch-size 1 --cuda-graph-max-bs 1"
one_batch() { timeout 60 python3 bench/one_batch.py $ARGS "$@" 2>&1 | quiet | grep -E "^ +[0-9]+ "; }
for round in 1 2; do
  echo "-- round $round: online fp8, default GEMV configs"; one_batch --quantization fp8
  [ -s $LOG/gemv.json ] && { echo "-- round $round: online fp8, swept configs";
    RADIXLM_GEMV_CONFIGS=$LOG/gemv.json one_batch --quantization fp8; }
done
echo "-- bf16"; one_batch
