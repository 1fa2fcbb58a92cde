#!/usr/bin/env bash
# GPU run T5 (one H200, ~5 minutes; issue #19): the final code of the session (the Sampler's argmax injected by the
# executor) on CUDA, then Llama-3.1-8B batch 1, online FP8 and bf16 alternating three times, and the FP8 head.
#   bash bench/gpu/session_t5.sh      (GPU machine, repository root; carry .whl)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
cuda_tests 240 tests/unit/test_argmax.py tests/unit/test_sampling.py tests/unit/test_cuda_graph.py \
  tests/unit/test_static_batch.py tests/unit/test_gluon_gemv.py tests/parity/test_fp8.py
for round in 1 2 3; do
  llama_batch1 --quantization fp8
  llama_batch1
done
llama_batch1 --quantization fp8 --quantize-lm-head
