#!/usr/bin/env bash
# GPU run N3 (one H200, ~4 minutes): the LoRA decode with run N2's expand launches as the defaults (gate_up's
# SiLU-mul expand two tiles of 128 a program, merged projections' loads two stages deep): the dense-kernel GPU
# tests, Llama-3.1-8B decode with 0 / 1 / 4 / 16 rank-16 adapters at batch 1 / 32 / 128 (best of 2), and 16
# rank-64 adapters at batch 128.
#   bash bench/gpu/session_n3.sh     (GPU machine, repository root; carry .whl and .carry)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/unit/test_lora_kernels.py -k "dense or graph or config" \
  2>&1 | quiet | grep -E "passed|failed|^FAILED|^E  " | head -12
lora_e2e 240 --ranks 16 --num-adapters 0 1 4 16 --batch-size 1 32 128 | tail -16
lora_e2e 75 --ranks 64 --num-adapters 16 --batch-size 128 --skip-base | tail -4
