#!/usr/bin/env bash
# GPU run L9 at commit d416469 (one H200, ~1 minute): per-kernel device time of a decode layer's LoRA
# (bench/gpu/lora_profile.py; its dense mode removed since: `git checkout d416469` to rerun as it ran).
#   bash bench/gpu/session_l9.sh     (GPU machine, repository root; carry .whl and .carry)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
which ncu nsys 2>&1 | head -2
timeout 200 python3 bench/gpu/lora_profile.py --tokens 1 32 128 --adapters 1 16 2>&1 | quiet | grep -v "^\s*$" \
  | head -150
