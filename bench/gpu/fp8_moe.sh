#!/usr/bin/env bash
# Issue #19, FP8 experts, on one H200 (~8 minutes): the GPU tests (a tiny block-FP8 Qwen3-MoE checkpoint against
# HF through the Triton fused MoE and CUDA graphs; the FP8 kernels at real shapes and in CUDA graphs); the fused
# MoE bench's block-FP8 table (DeepSeek-V3 TP1 and Qwen3-30B-A3B experts vs bf16, bench/gpu/fused_moe.py --fp8);
# and static-batch decode with random weights: DeepSeek-V2-Lite bf16 vs online FP8, and DeepSeek-V3 cut to 5
# layers (3 dense, 2 MoE) as a block-FP8 checkpoint (quantization_config given on the command line).
#   bash bench/gpu/fp8_moe.sh     (GPU machine, repository root; wheels in .whl)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
start=$(date +%s)
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/parity/test_fp8_moe.py tests/parity/test_fp8.py \
  tests/unit/test_fp8_kernels.py -k "cuda or real_shapes" 2>&1 | quiet | tee $LOG/fp8_moe_tests.txt | tail -6
timeout 200 python3 bench/gpu/fused_moe.py --fp8 --shapes deepseek-v3-tp1 qwen3-30b-a3b 2>&1 | quiet \
  | tee $LOG/fused_moe_fp8.txt
one_batch() {
  timeout 100 python3 bench/one_batch.py --load-format dummy --skip-tokenizer-init --batch-size 1 32 128 \
    --input-len 128 --output-len 64 --cuda-graph-max-bs 128 "$@" 2>&1 | quiet | tail -4
}
echo "== DeepSeek-V2-Lite bf16"; one_batch --model-path deepseek-v2-lite | tee $LOG/one_batch_v2lite_bf16.txt
echo "== DeepSeek-V2-Lite online FP8"
one_batch --model-path deepseek-v2-lite --quantization fp8 | tee $LOG/one_batch_v2lite_fp8.txt
echo "== DeepSeek-V3, 5 layers, block FP8"
one_batch --model-path deepseek-v3 --json-model-override-args '{"num_hidden_layers": 5, "quantization_config":
  {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic", "fmt": "e4m3"}}' \
  | tee $LOG/one_batch_v3_5l_fp8.txt
echo "total $(( $(date +%s) - start )) s"
