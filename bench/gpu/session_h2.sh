#!/usr/bin/env bash
# GPU run H, part 2 (one H200, ~9 minutes): the swap-AB FP8 decode GEMV (native FP8 wgmma, split K reduced by
# the last program) and the FP8 KV decode kernel computing in fp16 with doubled key blocks.  FP8 kernel, FP8
# attention and FP8 model tests on CUDA; the GEMV's config sweep against bf16 cuBLAS (fp8_gemm.py --tune-gemv);
# the FP8 KV kernel table (fp8_kv.py); Llama-3.1-8B batch 1 / 32, bf16 against online FP8, with the time left.
#   bash bench/gpu/session_h2.sh     (GPU machine, repository root; wheels in .whl)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
start=$(date +%s)
mark() { echo "== $1 (at $(( $(date +%s) - start )) s)"; }
left() { echo $(( 570 - ($(date +%s) - start) )); }
mark tests
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/unit/test_fp8_kernels.py \
  tests/unit/test_triton_attention_fp8.py 2>&1 | quiet | tee $LOG/h2_tests.txt | grep -E "passed|failed|Error|^FAILED" | head -20
timeout 80 python3 -m pytest -q -p no:cacheprovider tests/parity/test_fp8.py tests/parity/test_fp8_kv.py -k cuda \
  2>&1 | quiet | tee $LOG/h2_parity.txt | grep -E "passed|failed|Error|^FAILED" | head -20
mark "GEMV sweep"
timeout 200 python3 bench/gpu/fp8_gemm.py --tune-gemv --shapes llama8b-qkv llama8b-o llama8b-gate_up llama8b-down \
  v3-o --tokens 1 16 2>&1 | quiet | tee $LOG/h2_gemv.txt
mark "fp8 kv kernel"
timeout 90 python3 bench/gpu/fp8_kv.py 2>&1 | quiet | tee $LOG/h2_kv.txt
mark "llama batch 1 and 32"
for q in "--quantization fp8" ""; do
  [ $(left) -gt 35 ] && timeout $(left) python3 bench/one_batch.py --model-path llama-3.1-8b --load-format dummy \
    --skip-tokenizer-init --batch-size 1 32 --input-len 128 --output-len 128 $q 2>&1 | quiet | tail -3
done
mark done
