#!/usr/bin/env bash
# GPU run K6 (one H200, ~4 minutes): the LoRA shrink/expand kernels (issue #22) on CUDA: their tests (bf16, CUDA
# graphs with new metadata), then shrink + expand against the base bf16 GEMM at Llama-3.1-8B shapes.
#   bash bench/gpu/session_k6.sh     (GPU machine, repository root; carry .whl and .carry)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/unit/test_lora_kernels.py 2>&1 | quiet \
  | grep -E "passed|failed|^FAILED|^E  " | head -12
timeout 150 python3 bench/gpu/lora_kernels.py --shapes qkv gate_up down --ranks 16 64 --adapters 1 16 2>&1 | quiet \
  | grep -v "^\s*$" | head -70
