#!/usr/bin/env bash
# GPU run G, part 4 (one H200, ~1.5 minutes): Llama-3.1-8B at long context, 4 requests x 30k tokens (one static
# batch: one_batch prefills the batch in one forward, so 8 x 32k needed 14 GiB for one activation and ran out of
# memory in part 3), bf16 weights, KV cache bf16 against fp8_e4m3.
#   bash bench/gpu/session_g4.sh     (GPU machine, repository root; wheels in .whl)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
for kv in auto fp8_e4m3; do
  timeout 80 python3 bench/one_batch.py --model-path llama-3.1-8b --load-format dummy --skip-tokenizer-init \
    --batch-size 4 --input-len 30000 --output-len 32 --kv-cache-dtype $kv 2>&1 | quiet | tail -3
done
