#!/usr/bin/env bash
# GPU run J4 (one H200, ~8 minutes): the tests J3 ran out of time for (the FP8 kernels and fused quantizers with
# PDL triggered after the GEMV's and the decode attention's main loops; the attention kernels; CUDA graphs), then
# the final numbers: Llama-3.1-8B batch 1 / 32 in bf16, online FP8, FP8 + FP8 KV, and FP8 with
# RADIXLM_DISABLE_PDL=1; DeepSeek-V3 cut to 5 layers (3 dense, 2 MoE) in bf16 and block FP8.
#   bash bench/gpu/session_j4.sh     (GPU machine, repository root; carry .whl and .carry)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/unit/test_fp8_kernels.py tests/unit/test_fused_quant.py \
  tests/parity/test_fp8_fused.py 2>&1 | quiet | grep -E "passed|failed|^FAILED|^E " | head -20
timeout 110 python3 -m pytest -q -p no:cacheprovider tests/unit/test_triton_attention.py \
  tests/unit/test_triton_attention_fp8.py tests/unit/test_cuda_graph.py -k "decode or graph or agree or backend" \
  2>&1 | quiet | grep -E "passed|failed|^FAILED|^E " | head -12
ARGS="--load-format dummy --skip-tokenizer-init --batch-size 1 32 --input-len 128 --output-len 64"
one_batch() { timeout 60 python3 bench/one_batch.py $ARGS "$@" 2>&1 | quiet | grep -E "KV cache|^ +[0-9]+ "; }
for q in "" "--quantization fp8" "--quantization fp8 --kv-cache-dtype fp8_e4m3"; do
  echo "-- llama-3.1-8b ${q:-bf16}"; one_batch --model-path llama-3.1-8b $q
done
echo "-- llama-3.1-8b --quantization fp8, RADIXLM_DISABLE_PDL=1"
RADIXLM_DISABLE_PDL=1 one_batch --model-path llama-3.1-8b --quantization fp8
BLOCK_FP8='{"num_hidden_layers": 5, "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}}'
echo "-- deepseek-v3, 5 layers, bf16"; one_batch --model-path deepseek-v3 --json-model-override-args '{"num_hidden_layers": 5}'
echo "-- deepseek-v3, 5 layers, block fp8"; one_batch --model-path deepseek-v3 --json-model-override-args "$BLOCK_FP8"
