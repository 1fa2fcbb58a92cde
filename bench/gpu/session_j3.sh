#!/usr/bin/env bash
# GPU run J3 (one H200, ~6 minutes): PDL with the FP8 GEMV and the split-KV decode attention triggering after their
# main loops (run J2: with every kernel triggering first thing, FP8 decode was 2.4 % slower with PDL), and the
# per-token SiLU-mul quantizer reading its row in one tile (J2: 4.31 against 2.17 us unfused at M = 1).
# Tests on CUDA, bench/gpu/fused_quant.py, then Llama-3.1-8B batch 1 / 32 with PDL and with RADIXLM_DISABLE_PDL=1.
#   bash bench/gpu/session_j3.sh     (GPU machine, repository root; carry .whl and .carry)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/unit/test_fp8_kernels.py tests/unit/test_fused_quant.py \
  tests/parity/test_fp8_fused.py tests/unit/test_triton_attention.py -k "gemv or pdl or fused or quant or decode" \
  2>&1 | quiet | grep -E "passed|failed|^FAILED|^E " | head -20
timeout 90 python3 bench/gpu/fused_quant.py 2>&1 | quiet
ARGS="--model-path llama-3.1-8b --load-format dummy --skip-tokenizer-init --batch-size 1 32 --input-len 128 --output-len 64"
one_batch() { timeout 60 python3 bench/one_batch.py $ARGS "$@" 2>&1 | quiet | grep -E "^ +[0-9]+ "; }
for q in "" "--quantization fp8" "--quantization fp8 --kv-cache-dtype fp8_e4m3"; do
  echo "-- flags: ${q:-bf16}"; one_batch $q
  echo "-- flags: ${q:-bf16}, RADIXLM_DISABLE_PDL=1"; RADIXLM_DISABLE_PDL=1 one_batch $q
done
