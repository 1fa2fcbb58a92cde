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
cd bench
timeout 240 python3 lora_bench.py --model-path llama-3.1-8b --load-format dummy --ranks 16 --num-adapters 0 1 4 16 \
  --batch-size 1 32 128 --input-len 256 --output-len 32 --repeat 2 --cuda-graph-max-bs 128 2>&1 | quiet \
  | grep -v "^\s*$" | grep -v "INFO\|it/s" | tail -16
timeout 75 python3 lora_bench.py --model-path llama-3.1-8b --load-format dummy --ranks 64 --num-adapters 16 \
  --batch-size 128 --input-len 256 --output-len 32 --repeat 2 --cuda-graph-max-bs 128 --skip-base 2>&1 \
  | quiet | grep -v "^\s*$" | grep -v "INFO\|it/s" | tail -4
