#!/usr/bin/env bash
# GPU run K2 (one H200, ~3 minutes): where the FP8 batch-1 decode step goes inside its CUDA graph: the kernels of
# one replay in order, with their gaps, for Llama-3.1-8B in online FP8 and in bf16.
#   bash bench/gpu/session_k2.sh     (GPU machine, repository root; carry .whl and .carry)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
ARGS="--model-path llama-3.1-8b --load-format dummy --skip-tokenizer-init --cases 1x256 --replay-kernels"
for q in "--quantization fp8" ""; do
  echo "-- ${q:-bf16}"; timeout 120 python3 bench/decode_profile.py $ARGS $q 2>&1 | quiet | grep -v "^\s*$" | head -80
done
