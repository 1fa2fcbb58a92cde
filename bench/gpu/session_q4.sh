#!/usr/bin/env bash
# GPU run Q4 (one H200, ~2 minutes; issue #19): one CUDA-graph replay of Llama-3.1-8B batch-1 decode, kernel by
# kernel, online FP8 and bf16, at the code that serves (after runs O-Q): where a step goes now, for the next
# design (K2's table is from before the fused quantizers, the rotary K/V store and the GEMV preload).
#   bash bench/gpu/session_q4.sh      (GPU machine, repository root; carry .whl, .carry)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
PROFILE="--model-path llama-3.1-8b --load-format dummy --skip-tokenizer-init --cases 1x256 --replay-kernels"
for variant in "--quantization fp8" ""; do
  echo "-- $(date +%T) replay $variant"
  timeout 120 python3 bench/decode_profile.py $PROFILE $variant > $LOG/profile.txt 2>&1
  grep -v "Warning\|warn" $LOG/profile.txt | grep -A 40 "replay:" | head -44
done
