#!/usr/bin/env bash
# GPU run K1 (one H200, ~7 minutes): does an L2 prefetch of only the first tiles of each GEMV program's weight
# rows, issued before its PDL wait, shorten the FP8 decode step?  (J1 prefetched whole slices: slower.)  The GEMV
# tests on CUDA with the prefetch, the quantizer + GEMV layer per prefetch size, then Llama-3.1-8B batch 1 end
# to end in bf16 and online FP8 with RADIXLM_GEMV_PREFETCH_K = 0, 256, 512, 1024 (bytes of each weight row).
#   bash bench/gpu/session_k1.sh     (GPU machine, repository root; carry .whl and .carry)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/unit/test_fp8_kernels.py -k "gemv or pdl" 2>&1 | quiet \
  | grep -E "passed|failed|^FAILED|^E " | head -12
timeout 150 python3 bench/gpu/fp8_gemm.py --pdl --shapes llama8b-qkv llama8b-o llama8b-gate_up llama8b-down \
  --tokens 1 2>&1 | quiet
ARGS="--model-path llama-3.1-8b --load-format dummy --skip-tokenizer-init --batch-size 1 --input-len 128 --output-len 64"
one_batch() { timeout 60 python3 bench/one_batch.py $ARGS "$@" 2>&1 | quiet | grep -E "^ +[0-9]+ "; }
echo "-- bf16"; one_batch
for k in 0 256 512 1024 0; do
  echo "-- online fp8, RADIXLM_GEMV_PREFETCH_K=$k"; RADIXLM_GEMV_PREFETCH_K=$k one_batch --quantization fp8
done
