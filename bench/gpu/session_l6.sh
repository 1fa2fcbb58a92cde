#!/usr/bin/env bash
# GPU run L6 (one H200, ~5 minutes): the peer for multi-LoRA decode in the same call as ours: HF transformers + peft
# generate with 1 and 4 rank-16 adapters in a batch (adapter_names) against adapters disabled, at batch 1 and 32,
# then bench/lora_bench.py's decode table at the same shapes.
#   bash bench/gpu/session_l6.sh     (GPU machine, repository root; carry .whl and .carry)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
cd bench
timeout 150 python3 hf_lora_peer.py --model-path llama-3.1-8b --rank 16 --batch-size 1 32 --num-adapters 1 4 \
  --input-len 256 --output-len 32 2>&1 | quiet | grep -v "^\s*$" | grep -v "it/s\]" | tail -12
timeout 170 python3 lora_bench.py --model-path llama-3.1-8b --load-format dummy --ranks 16 --num-adapters 0 1 4 \
  --batch-size 1 32 --input-len 256 --output-len 32 --repeat 1 2>&1 | quiet | grep -v "^\s*$" \
  | grep -v "INFO\|it/s" | tail -14
