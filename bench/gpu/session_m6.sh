#!/usr/bin/env bash
# GPU run M6 (one H200, ~6 minutes): the dense decode with gate_up's expand fused with the SiLU-mul: the LoRA GPU
# tests, the decode layer's profile (projections + activation), Llama-3.1-8B decode with 1, 4 and 16 rank-16
# adapters against LoRA off (best of 2), 16 rank-64 adapters at batch 128, and the offline Engine (256 prompts,
# LoRA off against 16 adapters, best of 2).
#   bash bench/gpu/session_m6.sh     (GPU machine, repository root; carry .whl and .carry)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/unit/test_lora_kernels.py tests/unit/test_cuda_graph.py \
  -k "lora or Lora or LoRA or dense" 2>&1 | quiet | grep -E "passed|failed|^FAILED|^E  " | head -12
cd bench
timeout 240 python3 lora_bench.py --model-path llama-3.1-8b --load-format dummy --ranks 16 --num-adapters 0 1 4 16 \
  --batch-size 1 32 128 --input-len 256 --output-len 32 --repeat 2 --cuda-graph-max-bs 128 2>&1 | quiet \
  | grep -v "^\s*$" | grep -v "INFO\|it/s" | tail -16
cd ..
timeout 90 python3 bench/gpu/lora_profile.py --tokens 1 128 --adapters 1 16 2>&1 | quiet \
  | grep -E "replay|_lora|silu" | head -70
cd bench
timeout 75 python3 lora_bench.py --model-path llama-3.1-8b --load-format dummy --ranks 64 --num-adapters 16 \
  --batch-size 128 --input-len 256 --output-len 32 --repeat 2 --cuda-graph-max-bs 128 --skip-base 2>&1 \
  | quiet | grep -v "^\s*$" | grep -v "INFO\|it/s" | tail -4
timeout 200 python3 lora_bench.py --model-path llama-3.1-8b --load-format dummy --ranks 16 --num-adapters 0 16 \
  --input-len 256 --output-len 128 --offline-prompts 256 --skip-steps --repeat 2 2>&1 | quiet \
  | grep -v "^\s*$" | grep -v "INFO\|it/s" | tail -8
