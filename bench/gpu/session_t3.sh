#!/usr/bin/env bash
# GPU run T3 (one H200, ~4 minutes; issue #19): the Gluon GEMV's launch chosen inside the step, not alone: Llama-3.1-8B
# online FP8 batch 1 with each launch of a few (RADIXLM_GLUON_LAUNCHES tables for qkv, o and down; gate_up on the
# Gluon kernel too), two rounds, and bf16 for the ratio.
#   bash bench/gpu/session_t3.sh      (GPU machine, repository root; carry .whl)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
narrow() { echo "{\"6144,4096\": [$1], \"4096,4096\": [$1], \"4096,14336\": [$1]${2:+, \"28672,4096\": [$2]}}"; }
variant() {  # variant NAME JSON
  echo "$2" > $LOG/$1.json
  (export RADIXLM_GLUON_LAUNCHES=$LOG/$1.json; echo "-- $1: $2"; llama_batch1 --quantization fp8)
}
for round in 1 2; do
  echo "-- default launch (64, 3, 1, 8, 2):"; llama_batch1 --quantization fp8
  variant s8 "$(narrow '64, 4, 1, 4, 2')"
  variant pre4 "$(narrow '64, 4, 1, 8, 4')"
  variant pre3 "$(narrow '64, 3, 1, 8, 3')"
  variant pre1 "$(narrow '64, 3, 1, 8, 1')"
  variant ring6 "$(narrow '64, 6, 1, 8, 6')"
  variant gate_up64 "$(narrow '64, 3, 1, 8, 2' '64, 4, 1, 1, 2')"
  variant gate_up128 "$(narrow '64, 3, 1, 8, 2' '128, 3, 1, 1, 2')"
done
llama_batch1
