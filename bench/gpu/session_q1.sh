#!/usr/bin/env bash
# GPU run Q1 (one H200, ~9 minutes; issue #19): online FP8's decode in W8A16 with the norms and SiLU-mul computed
# by the GEMV (deferred_input), against the tree before (1e420d7 unpacked in .base: `rm -rf .base && mkdir .base &&
# git archive 1e420d7 radixlm bench/one_batch.py | tar -x -C .base`; carry .whl, .carry, .base).
# The layer microbenchmark, Llama-3.1-8B batch-1 decode alternating trees, CUDA tests, one replay kernel by kernel.
# Ran at b21a751 (reverted: W8A16 lost, docs/benchmarks.md "GPU run Q1"); `git checkout b21a751` to rerun it.
#   bash bench/gpu/session_q1.sh      (GPU machine, repository root)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 120 python3 bench/gpu/fp8_gemm.py --w8a16 --shapes llama8b-qkv llama8b-o llama8b-gate_up llama8b-down \
  --tokens 1 16 2>&1 | grep -v Warning
base_batch() { echo "-- $(date +%T) 1e420d7 $*"; (cd .base && PYTHONPATH=/tmp/site:$PWD timeout 60 python3 \
  bench/one_batch.py $LLAMA_BATCH1 "$@" 2>&1 | quiet | grep -E "^ +[0-9]+ "); }
base_batch --quantization fp8
llama_batch1 --quantization fp8
llama_batch1
llama_batch1 --quantization fp8 --quantize-lm-head
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/unit/test_gemv_w8a16.py tests/unit/test_fused_quant.py \
  tests/parity/test_fp8.py tests/parity/test_fp8_fused.py tests/unit/test_cuda_graph.py 2>&1 | quiet > $LOG/tests.txt
grep -E "^FAILED|^E  " $LOG/tests.txt | head -12; tail -1 $LOG/tests.txt
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/unit/test_fp8_kernels.py -k "gemv or online or pdl" 2>&1 \
  | quiet > $LOG/tests_gemv.txt
grep -E "^FAILED|^E  " $LOG/tests_gemv.txt | head -6; tail -1 $LOG/tests_gemv.txt
base_batch --quantization fp8
llama_batch1 --quantization fp8
base_batch
llama_batch1 --quantization fp8 --quantize-lm-head --kv-cache-dtype fp8_e4m3
timeout 90 python3 bench/decode_profile.py --model-path llama-3.1-8b --load-format dummy --skip-tokenizer-init \
  --cases 1x256 --replay-kernels --quantization fp8 > $LOG/profile.txt 2>&1; grep "replay:" $LOG/profile.txt
grep "mean" $LOG/profile.txt | head -14
