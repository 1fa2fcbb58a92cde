#!/usr/bin/env bash
# GPU run P3 (one H200, ~4 minutes; issue #19): what the split-K GEMVs' reduction tail costs
# (RADIXLM_GEMV_NO_REDUCE=1: split programs store their partials and exit; outputs wrong, timing only), with and
# without the online-FP8 LM head (RADIXLM_FP8_LM_HEAD=1).  Experiments of the tree at its commit (see git log).
#   bash bench/gpu/session_p3.sh      (GPU machine, repository root; carry .whl, .carry)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
GEMM="python3 bench/gpu/fp8_gemm.py --pdl --tokens 1 --shapes llama8b-qkv llama8b-o llama8b-gate_up llama8b-down"
echo "-- isolated, as served"; timeout 120 $GEMM 2>&1 | quiet | grep -v "^\s*$" | tail -12
echo "-- isolated, no reduction"; RADIXLM_GEMV_NO_REDUCE=1 timeout 120 $GEMM 2>&1 | quiet | grep -v "^\s*$" | tail -12
ARGS="--model-path llama-3.1-8b --load-format dummy --skip-tokenizer-init --input-len 128 --output-len 64 \
  --batch-size 1 --cuda-graph-max-bs 1"
one_batch() { echo "-- $(date +%T) no_reduce ${RADIXLM_GEMV_NO_REDUCE:-0} lm_head ${RADIXLM_FP8_LM_HEAD:-0} $*"
  timeout 60 python3 bench/one_batch.py $ARGS "$@" 2>&1 | quiet | grep -E "^ +[0-9]+ "; }
for round in 1 2; do
  one_batch --quantization fp8
  RADIXLM_GEMV_NO_REDUCE=1 one_batch --quantization fp8
  RADIXLM_FP8_LM_HEAD=1 one_batch --quantization fp8
  RADIXLM_GEMV_NO_REDUCE=1 RADIXLM_FP8_LM_HEAD=1 one_batch --quantization fp8
done
one_batch
