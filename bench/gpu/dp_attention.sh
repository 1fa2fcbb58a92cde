#!/usr/bin/env bash
# Data-parallel attention, model side (issue #20, first increment) on a 4-GPU machine (nvidia-h200-x4, ~3 minutes):
# the CPU-tested parity on CUDA (NCCL attention groups and their gloo control groups, Triton attention and MoE
# kernels, IDLE ranks, and since a238468 CUDA graphs replaying every step in which all DP ranks decode or idle, the
# ranks' rows padded alike): tiny DeepSeek-V2/V3 at TP=4 with --dp-size 2 and 4, each DP rank's greedy tokens and
# prompt logits against one GPU running its requests alone; then the gloo unit test of the groups and the
# gather/scatter (padded forms included).
#   bash bench/gpu/dp_attention.sh     (GPU machine, repository root; wheels in .whl)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
start=$(date +%s)
mark() { echo "== $1 (at $(( $(date +%s) - start )) s)"; }
mark "dp attention parity (cuda)"
timeout 300 python3 -m pytest -q -p no:cacheprovider -rs tests/parity/test_dp_attention.py -k cuda 2>&1 | quiet \
  | tee $LOG/dp_attention_cuda.txt | grep -E "passed|failed|skipped|Error|^FAILED|^E " | head -30
mark "dp attention unit (gloo)"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/unit/test_dp_groups.py 2>&1 | quiet | tail -3
mark done
