#!/usr/bin/env bash
# GPU run G, part 2 (one H200, ~6 minutes): the decode GEMV on pre-quantized activations.  FP8 tests on CUDA
# (kernels at small and real shapes, FP8 models against HF, checkpoint KV scales), the GEMV's config sweep, the
# FP8 GEMM table at decode M, and Llama-3.1-8B batch 1, bf16 against --quantization fp8.
#   bash bench/gpu/session_g2.sh     (GPU machine, repository root; wheels in .whl)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
start=$(date +%s)
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/unit/test_fp8_kernels.py tests/parity/test_fp8.py \
  tests/parity/test_fp8_kv_scales.py -k "not cpu" 2>&1 | quiet | tee $LOG/fp8_tests.txt \
  | grep -E "passed|failed|Error|assert|^FAILED" | head -30
timeout 200 python3 bench/gpu/fp8_gemm.py --tune-gemv --shapes llama8b-qkv llama8b-o llama8b-gate_up \
  llama8b-down v3-o --tokens 1 16 2>&1 | quiet | grep -v skipped | tee $LOG/gemv_tune.txt
timeout 60 python3 bench/gpu/fp8_gemm.py --shapes llama8b-qkv llama8b-o llama8b-gate_up llama8b-down \
  --tokens 1 16 64 1024 --no-moe 2>&1 | quiet | tee $LOG/fp8_gemm.txt | tail -17
echo "elapsed $(( $(date +%s) - start )) s"
for q in "" "--quantization fp8"; do
  timeout 80 python3 bench/one_batch.py --model-path llama-3.1-8b --load-format dummy --skip-tokenizer-init \
    --batch-size 1 32 --input-len 128 --output-len 128 $q 2>&1 | quiet | tail -4
done
echo "total $(( $(date +%s) - start )) s"
