#!/usr/bin/env bash
# GPU run H, part 4 (one H200, ~5 minutes): after the multi-program per-token quantizer and the one-launch FP8
# KV store.  Their tests on CUDA; the GEMV table (layer = quantizer + GEMV); Llama-3.1-8B batch 1 / 32 in bf16,
# online FP8 and FP8 + FP8 KV; long context (4 x 30k) with the FP8 KV cache.
#   bash bench/gpu/session_h4.sh     (GPU machine, repository root; wheels in .whl)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
start=$(date +%s)
mark() { echo "== $1 (at $(( $(date +%s) - start )) s)"; }
LLAMA="--model-path llama-3.1-8b --load-format dummy --skip-tokenizer-init"
rows() { grep -E "KV cache| batch|^ +[0-9]+ "; }
mark tests
timeout 70 python3 -m pytest -q -p no:cacheprovider tests/unit/test_kv_store.py tests/unit/test_fp8_kernels.py \
  -k "quant or gemv or store" 2>&1 | quiet | tee $LOG/h4_tests.txt | grep -E "passed|failed|Error|^FAILED" | head
mark "GEMV table"
timeout 60 python3 bench/gpu/fp8_gemm.py --tune-gemv --shapes llama8b-qkv llama8b-o llama8b-gate_up llama8b-down \
  --tokens 1 2>&1 | quiet | grep -v "top 5" | tee $LOG/h4_gemv.txt
mark "llama batch 1 and 32"
for q in "" "--quantization fp8" "--quantization fp8 --kv-cache-dtype fp8_e4m3"; do
  echo "-- flags: ${q:-bf16}"
  timeout 50 python3 bench/one_batch.py $LLAMA --batch-size 1 32 --input-len 128 --output-len 128 $q 2>&1 \
    | quiet | rows
done
mark "long context, fp8_e4m3 KV cache"
timeout 60 python3 bench/one_batch.py $LLAMA --batch-size 4 --input-len 30000 --output-len 32 \
  --kv-cache-dtype fp8_e4m3 2>&1 | quiet | rows
mark done
