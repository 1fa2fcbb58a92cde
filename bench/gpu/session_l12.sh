#!/usr/bin/env bash
# GPU run L12 (one H200, ~2 minutes; it ran with --repeat 1 for want of device time, the script now asks for 2):
# offline Engine throughput with the L11 kernels, 256 prompts, LoRA off against 16 rank-16 adapters (prompt i
# under adapter i % 16).
#   bash bench/gpu/session_l12.sh     (GPU machine, repository root; carry .whl and .carry)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
cd bench
timeout 200 python3 lora_bench.py --model-path llama-3.1-8b --load-format dummy --ranks 16 --num-adapters 0 16 \
  --input-len 256 --output-len 128 --offline-prompts 256 --skip-steps --repeat 2 2>&1 | quiet \
  | grep -v "^\s*$" | grep -v "INFO\|it/s" | tail -8
