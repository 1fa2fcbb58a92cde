#!/usr/bin/env bash
# GPU run L8 at commit d416469 (one H200, ~4 minutes): decode LoRA without segments (bench/gpu/lora_dense.py,
# removed since with the dense path: `git checkout d416469` to rerun): the per-projection table against the
# segmented kernels, a sweep of the dense expand's tiles, and a whole layer in one graph.
#   bash bench/gpu/session_l8.sh     (GPU machine, repository root; carry .whl and .carry)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 240 python3 bench/gpu/lora_dense.py --layer 2>&1 | quiet | grep -v "^\s*$" | head -80
timeout 300 python3 bench/gpu/lora_dense.py --ranks 16 --shapes qkv gate_up --tokens 1 128 --adapters 1 16 \
  --sweep 2>&1 | quiet | grep -v "^\s*$" | head -60
