#!/usr/bin/env bash
# GPU run S8 (one H200, ~2 minutes; issue #19): the served Gluon GEMV at S7's best launch (one warp group, K split
# 4) on CUDA: its tests, then Llama-3.1-8B batch-1 decode with it and without it (RADIXLM_DISABLE_GLUON=1), with
# the FP8 LM head, and bf16.
#   bash bench/gpu/session_s8.sh      (GPU machine, repository root; carry .whl)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 80 python3 -m pytest -q -p no:cacheprovider tests/unit/test_gluon_gemv.py 2>&1 | quiet > $LOG/tests.txt
grep -E "^FAILED|^ERROR" $LOG/tests.txt | head -12; tail -1 $LOG/tests.txt
without() { (export RADIXLM_DISABLE_GLUON=1; echo "-- without Gluon:"; llama_batch1 "$@"); }
llama_batch1 --quantization fp8
without --quantization fp8
llama_batch1 --quantization fp8 --quantize-lm-head
llama_batch1
