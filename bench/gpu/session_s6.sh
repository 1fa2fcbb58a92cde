#!/usr/bin/env bash
# GPU run S6 (one H200, ~4 minutes; issue #19): Llama-3.1-8B batch-1 decode with the Gluon GEMV on the o, qkv and
# down projections (bench/gpu/gluon_step.py: S5's best launches, no K split) against the served step, each also
# with the FP8 LM head, and bf16; first the persistent gate_up + down kernel with 2-3 programs an SM.
#   bash bench/gpu/session_s6.sh      (GPU machine, repository root; carry .whl)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 120 python3 bench/gpu/gluon_persistent.py 2>&1 | quiet | tee $LOG/gluon_persistent_s6.txt
gluon_batch1() { echo "-- $(date +%T) gluon $*"; timeout 90 python3 bench/gpu/gluon_step.py $LLAMA_BATCH1 "$@" 2>&1 \
  | quiet | grep -E "^ +[0-9]+ |gluon_step|Error|error"; }
for round in 1 2; do
  llama_batch1 --quantization fp8
  gluon_batch1 --quantization fp8
done
llama_batch1 --quantization fp8 --quantize-lm-head
gluon_batch1 --quantization fp8 --quantize-lm-head
llama_batch1
