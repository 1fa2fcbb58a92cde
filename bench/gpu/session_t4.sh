#!/usr/bin/env bash
# GPU run T4 (one H200, ~7 minutes; issue #19): the session's code on CUDA (argmax, the Gluon GEMV on gate_up with
# WIDE_LAUNCH, the sm_90 compile check under Triton 3.6, FP8 parity, CUDA graphs, sampling), then Llama-3.1-8B
# batch 1 against the tree before the session's changes (.base: `mkdir .base && git archive e60fbf4 | tar -x -C
# .base`, carried), alternating, and with gate_up sent back to the Triton kernel (a RADIXLM_GEMV_CONFIGS entry).
#   bash bench/gpu/session_t4.sh      (GPU machine, repository root; carry .whl .base)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
cuda_tests 330 tests/unit/test_argmax.py tests/unit/test_gluon_gemv.py tests/unit/test_sm90_compile.py \
  tests/unit/test_fp8_kernels.py tests/unit/test_cuda_graph.py tests/unit/test_sampling.py \
  tests/unit/test_static_batch.py tests/parity/test_fp8.py tests/parity/test_fp8_fused.py
base() { (cd .base && export PYTHONPATH=/tmp/site:$PWD && echo "-- base tree:" && llama_batch1 "$@"); }
echo '{"28672,4096": [64, 128, 4, 4, 1, 1]}' > $LOG/gate_up_triton.json
triton_gate_up() { (export RADIXLM_GEMV_CONFIGS=$LOG/gate_up_triton.json; echo "-- gate_up on Triton:"; \
  llama_batch1 "$@"); }
for round in 1 2; do
  llama_batch1 --quantization fp8
  base --quantization fp8
  triton_gate_up --quantization fp8
  llama_batch1
  base
done
llama_batch1 --quantization fp8 --quantize-lm-head
base --quantization fp8 --quantize-lm-head
