#!/usr/bin/env bash
# GPU run S7 (one H200, ~6 minutes; issue #19): the served Gluon GEMV (radixlm/kernels/gluon_gemv.py) on CUDA:
# its tests and the FP8 tests around it, then Llama-3.1-8B batch-1 decode with it and without it
# (RADIXLM_DISABLE_GLUON=1), alternating, with and without the FP8 LM head, and bf16; then the GEMV table.
#   bash bench/gpu/session_s7.sh      (GPU machine, repository root; carry .whl)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/unit/test_gluon_gemv.py tests/unit/test_fp8_kernels.py \
  tests/parity/test_fp8.py tests/unit/test_cuda_graph.py 2>&1 | quiet > $LOG/tests.txt
grep -E "^FAILED|^ERROR" $LOG/tests.txt | head -12; tail -1 $LOG/tests.txt
without() { (export RADIXLM_DISABLE_GLUON=1; echo "-- without Gluon:"; llama_batch1 "$@"); }
for round in 1 2; do
  llama_batch1 --quantization fp8
  without --quantization fp8
done
llama_batch1 --quantization fp8 --quantize-lm-head
without --quantization fp8 --quantize-lm-head
llama_batch1
timeout 120 python3 bench/gpu/gluon_gemv.py --shapes o qkv down 2>&1 | quiet | tee $LOG/gluon_gemv_s7.txt
