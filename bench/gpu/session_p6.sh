#!/usr/bin/env bash
# GPU run P6 (one H200, ~2 minutes; issue #19): deeper weight pipelines for the small decode projections, so they
# need fewer (or no) K splits: the launch tables in bench/gpu/gemv_tables/ (RADIXLM_GEMV_CONFIGS; N1 swept 3-6
# stages only), Llama-3.1-8B batch-1 online-FP8 decode against the defaults in the same call.
# Then the online-FP8 parity tests on CUDA (Qwen3's had not run on a GPU).
#   bash bench/gpu/session_p6.sh      (GPU machine, repository root; carry .whl, .carry)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
llama_batch1 --quantization fp8
llama_batch1
for table in rows32_stages12 rows32_stages8 rows64_stages10 rows32_w8_stages12 rows16_stages12; do
  echo "== $table"; RADIXLM_GEMV_CONFIGS=bench/gpu/gemv_tables/$table.json llama_batch1 --quantization fp8
done
llama_batch1 --quantization fp8
llama_batch1
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/parity/test_fp8.py 2>&1 | quiet > $LOG/tests.txt
grep -E "^FAILED|^E  " $LOG/tests.txt | head -12; tail -1 $LOG/tests.txt
