#!/usr/bin/env bash
# GPU run G, part 1 (one H200, ~9 minutes): issue #19's FP8 kernels after the decode GEMV.  The FP8 kernel and
# model tests on CUDA (block >= 32, Hopper's FP8 accumulation bound), the decode GEMV's config sweep at
# Llama-3.1-8B and DeepSeek-V3 shapes, the FP8 GEMM table (block GEMM, the GEMV-dispatching linears, cuBLAS bf16
# and row-wise FP8), then a first Llama-3.1-8B batch-1 read, bf16 against --quantization fp8.
#   bash bench/gpu/session_g1.sh     (GPU machine, repository root; wheels in .whl)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
start=$(date +%s)
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/unit/test_fp8_kernels.py tests/parity/test_fp8.py \
  -k "not cpu" 2>&1 | quiet | tee $LOG/fp8_tests.txt | grep -E "passed|failed|Error|assert|^FAILED" | head -30
timeout 200 python3 bench/gpu/fp8_gemm.py --tune-gemv --shapes llama8b-qkv llama8b-o llama8b-gate_up \
  llama8b-down v3-o --tokens 1 16 2>&1 | quiet | grep -v skipped | tee $LOG/gemv_tune.txt
timeout 100 python3 bench/gpu/fp8_gemm.py --shapes llama8b-qkv llama8b-gate_up llama8b-down v3-o \
  --tokens 1 16 64 1024 4096 --no-moe 2>&1 | quiet | tee $LOG/fp8_gemm.txt
echo "elapsed $(( $(date +%s) - start )) s"
for q in "" "--quantization fp8"; do
  timeout 110 python3 bench/one_batch.py --model-path llama-3.1-8b --load-format dummy --skip-tokenizer-init \
    --batch-size 1 --input-len 128 --output-len 128 $q 2>&1 | quiet | tail -4
done
echo "total $(( $(date +%s) - start )) s"
