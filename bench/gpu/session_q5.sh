#!/usr/bin/env bash
# GPU run Q5 (one H200, ~1 minute; issue #19): the decode-sized online-FP8 layer, ours (quantizer + Triton GEMV)
# against cuBLAS's row-wise FP8 GEMM on rows padded to 16, and bf16 cuBLAS, at Llama-3.1-8B's shapes.
#   bash bench/gpu/session_q5.sh      (GPU machine, repository root; carry .whl, .carry)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 150 python3 bench/gpu/fp8_gemm.py --cublas-small-m --shapes llama8b-qkv llama8b-o llama8b-gate_up \
  llama8b-down --tokens 1 16 2>&1 | grep -v Warning
