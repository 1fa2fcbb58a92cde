#!/usr/bin/env bash
# Issue #19, FP8 activation quantization fused into RMSNorm and SiLU-mul, on one H200 (~2-3 minutes): the fused
# kernels' tests compiled (bits equal to norm / SiLU-mul then the quantizer, Llama-8B shapes included), tiny
# online-FP8 and block-FP8 Llamas fused vs unfused (bit-identical logits, decode in CUDA graphs), the FP8 tests the
# plumbing touches, then the old composition vs the fused kernel in CUDA graphs at M 1 and 16
# (bench/gpu/fused_quant.py).
#   bash bench/gpu/fused_quant.sh     (GPU machine, repository root; wheels in .whl)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
start=$(date +%s)
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/unit/test_fused_quant.py tests/parity/test_fp8_fused.py \
  2>&1 | tail -4
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/parity/test_fp8.py tests/unit/test_fp8_kernels.py \
  -k "linear_real_shapes or replay or cuda" 2>&1 | tail -3
timeout 120 python3 bench/gpu/fused_quant.py 2>&1 | quiet | tee $LOG/fused_quant.txt
echo "total $(( $(date +%s) - start )) s"
