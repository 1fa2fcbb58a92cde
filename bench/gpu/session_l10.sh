#!/usr/bin/env bash
# GPU run L10 (one H200, ~9 minutes): the LoRA shrink with serial split-K (the last split of a tile sums the
# partials, so the split count no longer trades against the expand) and both kernels launched with PDL: the LoRA GPU tests, the per-kernel profile of
# a decode layer, Llama-3.1-8B decode with 1 and 16 adapters in a rank-16 pool (and batch 1 / 128 in a rank-64 pool), and a tile sweep
# (now with the expand's bf16-dot variant) of gate_up and down at 128 tokens.
#   bash bench/gpu/session_l10.sh     (GPU machine, repository root; carry .whl and .carry)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 80 python3 -m pytest -q -p no:cacheprovider tests/unit/test_lora_kernels.py tests/unit/test_cuda_graph.py \
  -k "lora or Lora or LoRA" 2>&1 | quiet | grep -E "passed|failed|^FAILED|^E  " | head -12
timeout 50 python3 bench/gpu/lora_profile.py --modes base seg --tokens 1 32 128 --adapters 1 16 2>&1 | quiet \
  | grep -v "^\s*$" | grep -v "splitKreduce\|nvjet" | head -40
RADIXLM_DISABLE_PDL=1 timeout 30 python3 bench/gpu/lora_profile.py --modes seg --tokens 128 --adapters 16 2>&1 \
  | quiet | grep -v "^\s*$" | grep -v "splitKreduce\|nvjet" | head -4
cd bench
timeout 170 python3 lora_bench.py --model-path llama-3.1-8b --load-format dummy --ranks 16 --num-adapters 0 1 16 \
  --batch-size 1 32 128 --input-len 256 --output-len 32 --repeat 1 --cuda-graph-max-bs 128 2>&1 | quiet \
  | grep -v "^\s*$" | grep -v "INFO\|it/s" | tail -12
timeout 110 python3 lora_bench.py --model-path llama-3.1-8b --load-format dummy --ranks 64 --num-adapters 0 1 16 \
  --batch-size 1 128 --input-len 256 --output-len 32 --repeat 1 --cuda-graph-max-bs 128 --skip-base 2>&1 \
  | quiet | grep -v "^\s*$" | grep -v "INFO\|it/s" | tail -10
cd ..
timeout 130 python3 bench/gpu/lora_tune.py --shapes gate_up down --ranks 16 --max-rank 16 --tokens 128 2>&1 | quiet \
  | grep -v "^\s*$" | head -6
