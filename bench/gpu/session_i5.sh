#!/usr/bin/env bash
# GPU run I, part 5 (one H200, ~3 minutes): the KV pool sized after the caching allocator gives back what loading
# freed (ModelRunner._init_memory_pools).  The memory model's check again (I3: the engine's pool 7.45 % below the
# prediction, 7.09 GiB held besides weights and context), then the tokens that fit for Llama-3.1-8B in bf16, online
# FP8 and FP8 + FP8 KV (run H4: 826,059 / 826,011 / 1,652,022: the online-FP8 weights' freed half not reused).
#   bash bench/gpu/session_i5.sh     (GPU machine, repository root; carry .whl and .carry)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 240 python3 bench/dp_memory.py --model-path deepseek-v3 --fp8-blocks --check --check-layers 5 --layouts 8x1 \
  2>&1 | quiet | tail -3
for q in "" "--quantization fp8" "--quantization fp8 --kv-cache-dtype fp8_e4m3"; do
  echo "-- flags: ${q:-bf16}"
  timeout 60 python3 bench/one_batch.py --model-path llama-3.1-8b --load-format dummy --skip-tokenizer-init \
    --batch-size 1 32 --input-len 128 --output-len 64 $q 2>&1 | quiet | grep -E "KV cache|^ +[0-9]+ "
done
