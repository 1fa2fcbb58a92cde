#!/usr/bin/env bash
# GPU run G, part 3 (one H200, ~9.5 minutes): issue #19's end-to-end numbers.  FP8 GPU tests of the MoE and MLA
# parts; Llama-3.1-8B (dummy weights) batch 1 and 32 in bf16, --quantization fp8, and fp8 + --kv-cache-dtype
# fp8_e4m3; long context (8 x 32k) with a bf16 and an FP8 KV cache; a DeepSeek-V3 slice (5 layers: 3 dense, 2 MoE)
# in bf16 against block-FP8 weights; SGLang's 500-prompt offline setting with FP8 weights; the fused MoE with
# block-FP8 experts (bench/gpu/fused_moe.py --fp8); the 500 prompts in bf16 with what is left of the call.
#   bash bench/gpu/session_g3.sh     (GPU machine, repository root; wheels in .whl)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
start=$(date +%s)
mark() { echo "== $1 (at $(( $(date +%s) - start )) s)"; }
LLAMA="--model-path llama-3.1-8b --load-format dummy --skip-tokenizer-init"
BLOCK_FP8='{"num_hidden_layers": 5, "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}}'
mark tests
timeout 110 python3 -m pytest -q -p no:cacheprovider tests/unit/test_fp8_bmm.py tests/parity/test_mla_fp8_bmm.py \
  tests/parity/test_fp8_moe.py -k "cuda or gpu" 2>&1 | quiet | tee $LOG/g3_tests.txt \
  | grep -E "passed|failed|Error|^FAILED" | head -20
mark "llama batch 1 and 32"
for q in "" "--quantization fp8" "--quantization fp8 --kv-cache-dtype fp8_e4m3"; do
  echo "-- flags: ${q:-bf16}"
  timeout 60 python3 bench/one_batch.py $LLAMA --batch-size 1 32 --input-len 128 --output-len 128 $q 2>&1 \
    | quiet | tail -4
done
mark "long context, KV cache bf16 vs fp8_e4m3"
for kv in auto fp8_e4m3; do
  timeout 70 python3 bench/one_batch.py $LLAMA --batch-size 8 --input-len 32768 --output-len 32 \
    --kv-cache-dtype $kv 2>&1 | quiet | tail -3
done
mark "deepseek-v3 slice, bf16 vs block fp8"
timeout 70 python3 bench/one_batch.py --model-path deepseek-v3 --load-format dummy --skip-tokenizer-init \
  --json-model-override-args '{"num_hidden_layers": 5}' --batch-size 1 32 --input-len 128 --output-len 64 2>&1 \
  | quiet | tail -4
timeout 70 python3 bench/one_batch.py --model-path deepseek-v3 --load-format dummy --skip-tokenizer-init \
  --json-model-override-args "$BLOCK_FP8" --batch-size 1 32 --input-len 128 --output-len 64 2>&1 | quiet | tail -4
mark "offline 500 prompts"
for q in "--quantization fp8" "" ; do  # FP8 first; bf16 gets what is left of the call (run E has its number)
  if [ -z "$q" ]; then
    mark "fused MoE, block-FP8 experts vs bf16"
    timeout 60 python3 bench/gpu/fused_moe.py --fp8 --shapes deepseek-v3-tp1 2>&1 | quiet | tail -10
  fi
  left=$(( 570 - ($(date +%s) - start) ))
  echo "-- flags: ${q:-bf16} (timeout ${left} s)"
  [ $left -gt 30 ] && timeout $left python3 bench/offline_throughput.py $LLAMA --dataset random-ids \
    --num-prompts 500 --random-input-len 4096 --random-output-len 2048 --random-range-ratio 0 $q 2>&1 | quiet | tail -3
done
mark done
