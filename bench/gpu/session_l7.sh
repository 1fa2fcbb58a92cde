#!/usr/bin/env bash
# GPU run L7 (one H200, ~3 minutes), at commit 314e816 (since reverted: no gain): the LoRA kernels with
# vectorizable loads (the B pool stored as B^T, N contiguous; the shrink's K mask dropped when K is a multiple of
# the K tile; tmp read without the runtime rank mask): their tests, the per-projection table at 1 and 128 tokens,
# and Llama-3.1-8B decode with 16 rank-16 adapters in a rank-16 pool against base rows.
#   bash bench/gpu/session_l7.sh     (GPU machine, repository root; carry .whl and .carry)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/unit/test_lora_kernels.py 2>&1 | quiet \
  | grep -E "passed|failed|^FAILED|^E  " | head -8
timeout 40 python3 bench/gpu/lora_kernels.py --shapes qkv gate_up o down --ranks 16 --tokens 1 128 \
  --adapters 1 16 2>&1 | quiet | grep -v "^\s*$" | grep -v per-req | head -16
cd bench && timeout 110 python3 lora_bench.py --model-path llama-3.1-8b --load-format dummy --ranks 16 \
  --num-adapters 0 16 --batch-size 1 128 --input-len 256 --output-len 32 --repeat 1 --skip-base \
  --cuda-graph-max-bs 128 2>&1 | quiet | grep -v "^\s*$" | grep -v "INFO\|it/s" | tail -10
