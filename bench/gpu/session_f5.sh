#!/usr/bin/env bash
# GPU run F, part 5 (one H200, a short call): issue #19's FP8 kernels and FP8 linear layers on the GPU.  The FP8
# kernel tests at real shapes and in CUDA graphs, the FP8 models against HF on CUDA (block-wise checkpoint through
# the Triton GEMM, online FP8 through cuBLAS's row-wise scaled GEMM), then the block GEMM's TFLOP/s at Llama-3.1-8B
# and DeepSeek-V3 shapes against bf16 cuBLAS.
#   bash bench/gpu/session_f5.sh     (GPU machine, repository root; wheels in .whl)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
start=$(date +%s)
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/unit/test_fp8_kernels.py tests/parity/test_fp8.py \
  -k "not cpu" 2>&1 | quiet | tee $LOG/fp8_tests.txt | tail -8
timeout 90 python3 bench/gpu/fp8_gemm.py --shapes llama8b-qkv llama8b-gate_up llama8b-down v3-q_a v3-o \
  --tokens 1 64 1024 4096 --no-moe 2>&1 | quiet | tee $LOG/fp8_gemm.txt
echo "total $(( $(date +%s) - start )) s"
