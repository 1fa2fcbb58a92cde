#!/usr/bin/env bash
# GPU run P4 (one H200, ~6 minutes; issue #19): the split-K partials added by the norms (PartialSums) and
# --quantize-lm-head, against the tree before them (09e09d6 unpacked in .base: `rm -rf .base && mkdir .base &&
# git archive 09e09d6 radixlm bench/one_batch.py | tar -x -C .base`; carry .whl, .carry, .base).
# Tests on CUDA, then Llama-3.1-8B batch-1 decode, two rounds alternating, then one FP8 replay kernel by kernel.
#   bash bench/gpu/session_p4.sh      (GPU machine, repository root)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/unit/test_partial_sums.py tests/parity/test_fp8_fused.py \
  tests/parity/test_fp8.py tests/unit/test_fused_quant.py 2>&1 | quiet > $LOG/tests.txt
grep -E "^FAILED|^E  " $LOG/tests.txt | head -12; tail -1 $LOG/tests.txt
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/unit/test_fp8_kernels.py -k "gemv or pdl" 2>&1 | quiet \
  > $LOG/tests_gemv.txt
grep -E "^FAILED|^E  " $LOG/tests_gemv.txt | head -6; tail -1 $LOG/tests_gemv.txt
ARGS="--model-path llama-3.1-8b --load-format dummy --skip-tokenizer-init --input-len 128 --output-len 64 \
  --batch-size 1 --cuda-graph-max-bs 1"
one_batch() { echo "-- $(date +%T) this tree $*"
  timeout 60 python3 bench/one_batch.py $ARGS "$@" 2>&1 | quiet | grep -E "^ +[0-9]+ "; }
base_batch() { echo "-- $(date +%T) 09e09d6 $*"; (cd .base && PYTHONPATH=/tmp/site:$PWD timeout 60 python3 \
  bench/one_batch.py $ARGS "$@" 2>&1 | quiet | grep -E "^ +[0-9]+ "); }
for round in 1 2; do
  base_batch --quantization fp8
  one_batch --quantization fp8
  one_batch --quantization fp8 --quantize-lm-head
  base_batch
  one_batch
done
one_batch --quantization fp8 --kv-cache-dtype fp8_e4m3
one_batch --quantization fp8 --quantize-lm-head --kv-cache-dtype fp8_e4m3
timeout 90 python3 bench/decode_profile.py --model-path llama-3.1-8b --load-format dummy --skip-tokenizer-init \
  --cases 1x256 --replay-kernels --quantization fp8 > $LOG/profile.txt 2>&1; grep "replay:" $LOG/profile.txt
grep "mean" $LOG/profile.txt | head -12
