#!/usr/bin/env bash
# GPU run M4 (one H200, ~7 minutes): decode's shrink inside the base GEMM (the dense decode: the pool's A rows below
# each weight, an out-of-place expand): the LoRA GPU tests, the decode layer's profile (two launches against
# dense), Llama-3.1-8B decode with 1, 4 and 16 rank-16 adapters against LoRA off (best of 2), then 16 rank-64
# adapters at batch 128.
#   bash bench/gpu/session_m4.sh     (GPU machine, repository root; carry .whl and .carry)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/unit/test_lora_kernels.py tests/unit/test_cuda_graph.py \
  -k "lora or Lora or LoRA or dense" 2>&1 | quiet | grep -E "passed|failed|^FAILED|^E  " | head -12
timeout 90 python3 bench/gpu/lora_profile.py --tokens 1 32 128 --adapters 1 16 2>&1 | quiet \
  | grep -E "replay|_lora" | head -70
cd bench
timeout 240 python3 lora_bench.py --model-path llama-3.1-8b --load-format dummy --ranks 16 --num-adapters 0 1 4 16 \
  --batch-size 1 32 128 --input-len 256 --output-len 32 --repeat 2 --cuda-graph-max-bs 128 2>&1 | quiet \
  | grep -v "^\s*$" | grep -v "INFO\|it/s" | tail -16
timeout 75 python3 lora_bench.py --model-path llama-3.1-8b --load-format dummy --ranks 64 --num-adapters 16 \
  --batch-size 128 --input-len 256 --output-len 32 --repeat 2 --cuda-graph-max-bs 128 --skip-base 2>&1 \
  | quiet | grep -v "^\s*$" | grep -v "INFO\|it/s" | tail -6
