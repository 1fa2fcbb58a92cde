#!/usr/bin/env bash
# GPU run P6 (one H200, ~2 minutes; issue #19): deeper weight pipelines for the small decode projections, so they
# need fewer (or no) K splits: the launch tables in bench/gpu/gemv_tables/ (RADIXLM_GEMV_CONFIGS; N1 swept 3-6
# stages only), Llama-3.1-8B batch-1 online-FP8 decode against the defaults in the same call.
#   bash bench/gpu/session_p6.sh      (GPU machine, repository root; carry .whl, .carry)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
llama_batch1 --quantization fp8
for table in rows32_stages12 rows32_stages8 rows64_stages10 rows32_w8_stages12; do
  echo "== $table"; RADIXLM_GEMV_CONFIGS=bench/gpu/gemv_tables/$table.json llama_batch1 --quantization fp8
done
llama_batch1 --quantization fp8
