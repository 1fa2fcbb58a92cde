#!/usr/bin/env bash
# GPU run I, part 6 (one H200, ~4 minutes): the KV cache's K and V stored in one Triton launch (kernels/kv_store.py,
# was two index_put launches a layer for a bf16 cache, two store_fp8 ones for FP8).  Its tests and the Triton
# backend's over a pool on CUDA, CUDA-graph decode against eager, then Llama-3.1-8B batch 1 / 32 in bf16, online FP8
# and FP8 + FP8 KV (run I5 before it: 216.3 / 295.7 / 302.3 tok/s at batch 1).
#   bash bench/gpu/session_i6.sh     (GPU machine, repository root; carry .whl and .carry)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/unit/test_kv_store.py tests/unit/test_cuda_graph.py \
  tests/unit/test_triton_attention_fp8.py -k "store or latent or argument or backend or graph or agree" 2>&1 \
  | quiet | grep -E "passed|failed|^FAILED|^E " | head -12
for q in "" "--quantization fp8" "--quantization fp8 --kv-cache-dtype fp8_e4m3"; do
  echo "-- flags: ${q:-bf16}"
  timeout 60 python3 bench/one_batch.py --model-path llama-3.1-8b --load-format dummy --skip-tokenizer-init \
    --batch-size 1 32 --input-len 128 --output-len 64 $q 2>&1 | quiet | grep -E "^ +[0-9]+ "
done
