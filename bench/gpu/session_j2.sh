#!/usr/bin/env bash
# GPU run J2 (one H200, ~9 minutes): programmatic dependent launch through the whole decode layer (quantizers,
# GEMV, norms, rotary, SiLU-mul, K/V store, decode attention: kernels/pdl.py), the activation quantization fused
# into RMSNorm and SiLU-mul (kernels/fused_quant.py).  (At 3758fb7 it also ran FP8 with TMA GEMV weight tiles,
# an option removed since.)
# 1. tests on CUDA;  2. fused_quant.sh's micro-benchmark;  3. the FP8 layer without / with PDL;
# 4. Llama-3.1-8B batch 1 / 32: bf16, online FP8, FP8 + FP8 KV; bf16 and FP8 with
#    RADIXLM_DISABLE_PDL=1; bf16 and FP8 on the tree before the session (.base: `git archive 69e079f radixlm
#    bench/one_batch.py`), all in the same call.
#   bash bench/gpu/session_j2.sh     (GPU machine, repository root; carry .whl, .carry and .base)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/unit/test_fp8_kernels.py tests/unit/test_fused_quant.py \
  tests/parity/test_fp8_fused.py 2>&1 | quiet | grep -E "passed|failed|^FAILED|^E " | head -20
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/unit/test_kv_store.py tests/unit/test_cuda_graph.py \
  tests/unit/test_triton_attention.py tests/unit/test_triton_attention_fp8.py tests/unit/test_fused_ops.py \
  2>&1 | quiet | grep -E "passed|failed|^FAILED|^E " | head -12
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/parity/test_fp8.py -k cuda 2>&1 | quiet \
  | grep -E "passed|failed|^FAILED|^E " | head -12
timeout 90 python3 bench/gpu/fused_quant.py 2>&1 | quiet
timeout 100 python3 bench/gpu/fp8_gemm.py --pdl --shapes llama8b-qkv llama8b-o llama8b-gate_up llama8b-down \
  --tokens 1 16 2>&1 | quiet | grep -v "^total"
ARGS="--model-path llama-3.1-8b --load-format dummy --skip-tokenizer-init --batch-size 1 32 --input-len 128 --output-len 64"
one_batch() { timeout 60 python3 bench/one_batch.py $ARGS "$@" 2>&1 | quiet | grep -E "KV cache|^ +[0-9]+ "; }
for q in "" "--quantization fp8" "--quantization fp8 --kv-cache-dtype fp8_e4m3"; do
  echo "-- flags: ${q:-bf16}"; one_batch $q
done
for q in "" "--quantization fp8"; do
  echo "-- flags: ${q:-bf16}, RADIXLM_DISABLE_PDL=1"; RADIXLM_DISABLE_PDL=1 one_batch $q
  echo "-- flags: ${q:-bf16}, tree 69e079f"; (cd .base && PYTHONPATH=/tmp/site:$PWD one_batch $q)
done
