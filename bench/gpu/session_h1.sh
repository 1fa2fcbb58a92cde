#!/usr/bin/env bash
# GPU run H, part 1 (one H200, ~8 minutes): issue #19's batch-1 decode and FP8 KV reads.  The FP8 kernel and
# model tests on CUDA (the batch-1 GEMV that quantizes inside is new); its config sweep at M = 1 and the best
# config at M = 1, 2, 4, 8 against quant + GEMV and bf16 cuBLAS (fp8_gemm.py --tune-rows); the FP8 KV decode
# kernel's launch variants (fp8_kv.py --variants); whether this transformers has an offline FP8 peer.
#   bash bench/gpu/session_h1.sh     (GPU machine, repository root; wheels in .whl)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
start=$(date +%s)
mark() { echo "== $1 (at $(( $(date +%s) - start )) s)"; }
mark tests
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/unit/test_fp8_kernels.py tests/parity/test_fp8.py \
  2>&1 | quiet | tee $LOG/h1_tests.txt | grep -E "passed|failed|Error|^FAILED" | head -20
mark "batch-1 GEMV sweep"
timeout 230 python3 bench/gpu/fp8_gemm.py --tune-rows --shapes llama8b-qkv llama8b-o llama8b-gate_up llama8b-down \
  v3-o --tokens 1 2 4 8 2>&1 | quiet | tee $LOG/h1_rows.txt
mark "fp8 kv variants"
timeout 150 python3 bench/gpu/fp8_kv.py --variants 2>&1 | quiet | tee $LOG/h1_kv.txt
mark "HF fp8 peer"
f=$(python3 -c "import transformers.integrations.finegrained_fp8 as m; print(m.__file__)")
echo "finegrained_fp8.py triton kernels inline: $(grep -c 'triton.jit' $f); hub kernel loader: $(grep -c 'lazy_load_kernel' $f)"
python3 -c "import kernels" 2>&1 | tail -1
mark done
