#!/usr/bin/env bash
# GPU run L10 (one H200, ~3 minutes), on the tree of c128c4e but with both LoRA kernels launched with PDL and the
# expand's half-precision product as a lora_tune axis (so run as committed it times c128c4e's kernels): the LoRA
# shrink with serial split-K, the LoRA GPU tests, the per-kernel profile of a decode layer (and with PDL off),
# Llama-3.1-8B decode with 1 and 16 adapters in a rank-16 pool (and batch 1 / 128 in a rank-64 pool), and a tile
# sweep of the gate_up and down expand at 128 tokens.
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
