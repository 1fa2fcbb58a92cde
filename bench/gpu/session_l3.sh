#!/usr/bin/env bash
# GPU run L3 (one H200, ~6 minutes): the LoRA kernels with the expand defaults from L1 (expand_config) and the
# L1/L2 split-K rule: the tests, the per-projection cost table (sorted layout), and the joint sweep (per split
# count, the best shrink and the best expand over its partials).
#   bash bench/gpu/session_l3.sh     (GPU machine, repository root; carry .whl and .carry)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/unit/test_lora_kernels.py 2>&1 | quiet \
  | grep -E "passed|failed|^FAILED|^E  " | head -12
timeout 120 python3 bench/gpu/lora_kernels.py --shapes qkv gate_up o down --ranks 16 64 --tokens 1 128 \
  --adapters 1 16 2>&1 | quiet | grep -v "^\s*$" | grep -v per-req | head -40
timeout 400 python3 bench/gpu/lora_tune.py 2>&1 | quiet | grep -v "^\s*$" | head -40
