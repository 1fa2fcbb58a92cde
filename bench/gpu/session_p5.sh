#!/usr/bin/env bash
# GPU run P5 (one H200, ~4 minutes; issue #19): --quantize-lm-head as committed: its CUDA tests, then Llama-3.1-8B
# batch-1 decode with online FP8 (head bf16 / FP8), bf16, and the FP8 KV cache, two rounds alternating.
#   bash bench/gpu/session_p5.sh      (GPU machine, repository root; carry .whl, .carry)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/parity/test_fp8.py tests/parity/test_fp8_fused.py \
  tests/unit/test_cuda_graph.py 2>&1 | quiet > $LOG/tests.txt
grep -E "^FAILED|^E  " $LOG/tests.txt | head -12; tail -1 $LOG/tests.txt
for round in 1 2; do
  llama_batch1 --quantization fp8
  llama_batch1 --quantization fp8 --quantize-lm-head
  llama_batch1
done
llama_batch1 --quantization fp8 --quantize-lm-head --kv-cache-dtype fp8_e4m3
