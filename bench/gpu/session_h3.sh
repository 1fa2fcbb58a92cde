#!/usr/bin/env bash
# GPU run H, part 3 (one H200, ~9 minutes): issue #19's end-to-end numbers after the swap-AB GEMV, the one-pass
# per-token quantizer and the fp16 FP8-KV decode.  GEMV / quantizer and FP8 attention tests on CUDA; the GEMV
# table again (layer = quantizer + GEMV as served); Llama-3.1-8B batch 1 / 32 in bf16, online FP8 and FP8 + FP8
# KV; long context (4 x 30k) with a bf16 and an FP8 KV cache; the DeepSeek-V3 5-layer slice, bf16 vs block FP8.
#   bash bench/gpu/session_h3.sh     (GPU machine, repository root; wheels in .whl)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
start=$(date +%s)
mark() { echo "== $1 (at $(( $(date +%s) - start )) s)"; }
LLAMA="--model-path llama-3.1-8b --load-format dummy --skip-tokenizer-init"
BLOCK_FP8='{"num_hidden_layers": 5, "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}}'
mark tests
timeout 70 python3 -m pytest -q -p no:cacheprovider tests/unit/test_fp8_kernels.py -k "gemv or quant" 2>&1 | quiet \
  | tee $LOG/h3_tests.txt | grep -E "passed|failed|Error|^FAILED" | head -20
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/unit/test_triton_attention_fp8.py 2>&1 | quiet \
  | tee -a $LOG/h3_tests.txt | grep -E "passed|failed|Error|^FAILED" | head -20
mark "GEMV table"
timeout 60 python3 bench/gpu/fp8_gemm.py --tune-gemv --shapes llama8b-qkv llama8b-o llama8b-gate_up llama8b-down \
  --tokens 1 2>&1 | quiet | grep -v "top 5" | tee $LOG/h3_gemv.txt
mark "llama batch 1 and 32"
for q in "" "--quantization fp8" "--quantization fp8 --kv-cache-dtype fp8_e4m3"; do
  echo "-- flags: ${q:-bf16}"
  timeout 50 python3 bench/one_batch.py $LLAMA --batch-size 1 32 --input-len 128 --output-len 128 $q 2>&1 \
    | quiet | grep -E "KV cache| batch|^ +[0-9]+ "
done
mark "long context, KV cache bf16 vs fp8_e4m3"
for kv in auto fp8_e4m3; do
  timeout 60 python3 bench/one_batch.py $LLAMA --batch-size 4 --input-len 30000 --output-len 32 \
    --kv-cache-dtype $kv 2>&1 | quiet | grep -E "KV cache| batch|^ +[0-9]+ "
done
mark "deepseek-v3 slice, bf16 vs block fp8"
timeout 50 python3 bench/one_batch.py --model-path deepseek-v3 --load-format dummy --skip-tokenizer-init \
  --json-model-override-args '{"num_hidden_layers": 5}' --batch-size 1 32 --input-len 128 --output-len 64 2>&1 \
  | quiet | grep -E "KV cache| batch|^ +[0-9]+ "
timeout 50 python3 bench/one_batch.py --model-path deepseek-v3 --load-format dummy --skip-tokenizer-init \
  --json-model-override-args "$BLOCK_FP8" --batch-size 1 32 --input-len 128 --output-len 64 2>&1 | quiet | grep -E "KV cache| batch|^ +[0-9]+ "
mark done
