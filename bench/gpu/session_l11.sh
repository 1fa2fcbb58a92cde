#!/usr/bin/env bash
# GPU run L11 (one H200, ~5 minutes): the LoRA kernels as committed after L10 (serial split-K shrink; the expand's
# dot form in the pool's half precision with L10's tiles; no PDL): the LoRA GPU tests, the per-kernel profile of
# a decode layer, and Llama-3.1-8B decode with 1, 4 and 16 adapters (rank-16 pool; then 16 rank-64 adapters at
# batch 128).
#   bash bench/gpu/session_l11.sh     (GPU machine, repository root; carry .whl and .carry)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 80 python3 -m pytest -q -p no:cacheprovider tests/unit/test_lora_kernels.py tests/unit/test_cuda_graph.py \
  -k "lora or Lora or LoRA" 2>&1 | quiet | grep -E "passed|failed|^FAILED|^E  " | head -12
timeout 40 python3 bench/gpu/lora_profile.py --tokens 1 128 --adapters 1 16 2>&1 | quiet \
  | grep -v "^\s*$" | grep -v "splitKreduce\|nvjet" | head -40
cd bench
timeout 160 python3 lora_bench.py --model-path llama-3.1-8b --load-format dummy --ranks 16 --num-adapters 0 1 4 16 \
  --batch-size 1 32 128 --input-len 256 --output-len 32 --repeat 1 --cuda-graph-max-bs 128 2>&1 | quiet \
  | grep -v "^\s*$" | grep -v "INFO\|it/s" | tail -16
timeout 75 python3 lora_bench.py --model-path llama-3.1-8b --load-format dummy --ranks 64 --num-adapters 16 \
  --batch-size 128 --input-len 256 --output-len 32 --repeat 1 --cuda-graph-max-bs 128 --skip-base 2>&1 \
  | quiet | grep -v "^\s*$" | grep -v "INFO\|it/s" | tail -16
