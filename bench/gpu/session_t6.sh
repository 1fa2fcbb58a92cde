#!/usr/bin/env bash
# GPU run T6 (one H200, ~3 minutes; issue #19): the FP8 step with the quantizing norms and SiLU-mul (.v1), and also
# the attention merge (.v2), letting their dependent kernel (the FP8 GEMV) launch only when they exit instead of
# first thing; trees unpacked from 76cc126 with those pdl_trigger calls removed (git archive, then delete the
# `pdl_trigger(PDL)` before `pdl_wait(PDL)` in fused_quant.py's two kernels and in _decode_merge_kernel), carried.
#   bash bench/gpu/session_t6.sh      (GPU machine, repository root; carry .whl .v1 .v2)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
tree() { (cd $1 && export PYTHONPATH=/tmp/site:$PWD && echo "-- tree $1:" && llama_batch1 --quantization fp8); }
for round in 1 2 3; do
  llama_batch1 --quantization fp8
  tree .v1
  tree .v2
done
llama_batch1
