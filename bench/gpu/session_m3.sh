#!/usr/bin/env bash
# GPU run M3 (one H200, ~2 minutes): the decode layer's profile with the shrink folded into the base GEMM (every
# pool slot's A rows appended to the weight: "dense") against the two launches and M1's side-stream shrink, for
# rank-16 and rank-64 pools.
#   bash bench/gpu/session_m3.sh     (GPU machine, repository root; carry .whl and .carry)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 120 python3 bench/gpu/lora_profile.py --tokens 1 32 128 --adapters 1 16 2>&1 | quiet \
  | grep -v "^\s*$" | grep -v "splitKreduce\|nvjet" | grep -v "^ .*x4   _lora" | head -80
timeout 60 python3 bench/gpu/lora_profile.py --tokens 1 128 --adapters 1 16 --rank 64 \
  --modes base seg dense-gemm dense 2>&1 | quiet | grep -v "^\s*$" | grep "replay" | head -20
