#!/usr/bin/env bash
# GPU run L5 (one H200, ~7 minutes; L4 again: its decode table ran out of memory with two workers in one process,
# its offline runs were single; the tests are L4's): multi-LoRA serving end to end (issue #22): Llama-3.1-8B (random weights)
# with random rank-16/64 adapters on all seven projections: decode ms/step and prefill with 0/1/4/16 adapters at
# batch 1/32/128 against base-only, the cold adapter load, and the Engine's offline throughput.
#   bash bench/gpu/session_l5.sh     (GPU machine, repository root; carry .whl and .carry)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 230 python3 bench/lora_bench.py --model-path llama-3.1-8b --load-format dummy --ranks 16 64 \
  --num-adapters 0 1 4 16 --batch-size 1 32 128 --input-len 256 --output-len 32 --repeat 1 2>&1 | quiet \
  | grep -v "^\s*$" | grep -v "INFO\|it/s" | tail -40
timeout 200 python3 bench/lora_bench.py --model-path llama-3.1-8b --load-format dummy --ranks 16 \
  --num-adapters 0 1 4 16 --input-len 256 --output-len 128 --offline-prompts 256 --skip-steps --repeat 2 2>&1 | quiet \
  | grep -v "^\s*$" | grep -v "INFO\|it/s" | tail -12
