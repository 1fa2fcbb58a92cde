#!/usr/bin/env bash
# GPU run P2 (one H200, ~4 minutes; issue #19): when the FP8 decode GEMV lets the next kernel launch
# (RADIXLM_GEMV_TRIGGER_EIGHTHS: the share of a program's K tiles, in eighths, still to stream when it triggers
# PDL; 0 = after its loop, as before), and an online-FP8 LM head (RADIXLM_FP8_LM_HEAD=1, decode batches only).
# Both are experiments at 793c9c6; Llama-3.1-8B batch-1 decode.
#   bash bench/gpu/session_p2.sh      (GPU machine, repository root; carry .whl, .carry)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
for e in 0 2 8; do RADIXLM_GEMV_TRIGGER_EIGHTHS=$e timeout 100 python3 -m pytest -q -p no:cacheprovider \
  tests/unit/test_fp8_kernels.py -k "gemv or pdl" 2>&1 | quiet > $LOG/tests_$e.txt
  grep -E "^FAILED|^E  " $LOG/tests_$e.txt | head -6; echo "trigger $e: $(tail -1 $LOG/tests_$e.txt)"; done
ARGS="--model-path llama-3.1-8b --load-format dummy --skip-tokenizer-init --input-len 128 --output-len 64 \
  --batch-size 1 --cuda-graph-max-bs 1"
one_batch() { echo "-- $(date +%T) trigger ${RADIXLM_GEMV_TRIGGER_EIGHTHS:-0} lm_head ${RADIXLM_FP8_LM_HEAD:-0} $*"
  timeout 60 python3 bench/one_batch.py $ARGS "$@" 2>&1 | quiet | grep -E "^ +[0-9]+ "; }
for e in 0 1 2 4 8 0; do RADIXLM_GEMV_TRIGGER_EIGHTHS=$e one_batch --quantization fp8; done
RADIXLM_FP8_LM_HEAD=1 one_batch --quantization fp8
RADIXLM_FP8_LM_HEAD=1 RADIXLM_GEMV_TRIGGER_EIGHTHS=1 one_batch --quantization fp8
RADIXLM_FP8_LM_HEAD=1 RADIXLM_GEMV_TRIGGER_EIGHTHS=2 one_batch --quantization fp8
one_batch
RADIXLM_GEMV_TRIGGER_EIGHTHS=0 one_batch --quantization fp8
