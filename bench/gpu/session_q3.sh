#!/usr/bin/env bash
# GPU run Q3 (one H200, ~8 minutes; issue #19): SGLang's 500-prompt offline setting on Llama-3.1-8B (dummy
# weights) with bf16, online FP8 and online FP8 + fp8_e4m3 KV, in one call (the FP8 rows of docs/benchmarks.md
# were from run G, before the decode GEMV, the FP8 KV kernel work and the fused quantizers).
#   bash bench/gpu/session_q3.sh      (GPU machine, repository root; carry .whl, .carry)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
OFFLINE="--model-path llama-3.1-8b --load-format dummy --skip-tokenizer-init --dataset random-ids --num-prompts 500 \
  --random-input-len 4096 --random-output-len 2048 --random-range-ratio 0"
for variant in "" "--quantization fp8" "--quantization fp8 --kv-cache-dtype fp8_e4m3"; do
  echo "-- $(date +%T) offline 500 $variant"
  timeout 175 python3 bench/offline_throughput.py $OFFLINE $variant 2>&1 | quiet | grep -v "^\s*$" | tail -4
done
