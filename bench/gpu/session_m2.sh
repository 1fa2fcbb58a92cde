#!/usr/bin/env bash
# GPU run M2 (one H200, ~8 minutes): the fused LoRA launch (shrink and expand in one kernel, lora_fused_triton, what
# apply_lora runs): the LoRA GPU tests (incl. the fused kernel's race test at Llama shapes), the decode layer's
# profile (two launches, the side-stream shrink of M1, fused), Llama-3.1-8B decode with 1, 4 and 16 rank-16
# adapters against LoRA off (best of 2), then the fused kernel's launch sweep at batch 128.
#   bash bench/gpu/session_m2.sh     (GPU machine, repository root; carry .whl and .carry)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/unit/test_lora_kernels.py tests/unit/test_cuda_graph.py \
  -k "lora or Lora or LoRA or fused" 2>&1 | quiet | grep -E "passed|failed|^FAILED|^E  " | head -12
timeout 90 python3 bench/gpu/lora_profile.py --tokens 1 32 128 --adapters 1 16 2>&1 | quiet \
  | grep -v "^\s*$" | grep -v "splitKreduce\|nvjet" | head -80
(cd bench && timeout 240 python3 lora_bench.py --model-path llama-3.1-8b --load-format dummy --ranks 16 \
  --num-adapters 0 1 4 16 --batch-size 1 32 128 --input-len 256 --output-len 32 --repeat 2 --cuda-graph-max-bs 128 \
  2>&1 | quiet | grep -v "^\s*$" | grep -v "INFO\|it/s" | tail -16)
PYTHONPATH=$PYTHONPATH timeout 150 python3 bench/gpu/lora_tune.py --fused --ranks 16 --max-rank 16 --tokens 128 \
  2>&1 | quiet | tail -6
