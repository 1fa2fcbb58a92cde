#!/usr/bin/env bash
# Data-parallel attention served (issue #20, serving side) on a 4-GPU machine (nvidia-h200-x4, ~9 minutes):
# 1. tests/e2e/test_dp_serving.py on CUDA: a tiny DeepSeek-V3 Engine at --tp-size 2/4 with --dp-size 2/4 gives the
#    greedy and JSON-schema tokens of one GPU (NCCL, Triton kernels, overlap schedule, IDLE ranks, CUDA graphs with
#    padded DP shapes), ~3 minutes;
# 2. offline throughput of DeepSeek-V2-Lite (dummy bf16 weights) at TP=4 against TP=4 with --dp-size 2 and 4, CUDA
#    graphs on (under DP since a238468), and DP 4 with graphs off (what they buy), 512 random prompts of 512
#    tokens, 128 out.
#   bash bench/gpu/dp_serving.sh     (GPU machine, repository root; wheels in .whl)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
start=$(date +%s)
mark() { echo "== $1 (at $(( $(date +%s) - start )) s)"; }
mark "dp serving parity (cuda)"
timeout 240 python3 -m pytest -q -p no:cacheprovider -rs tests/e2e/test_dp_serving.py -k cuda 2>&1 | quiet \
  | tee $LOG/dp_serving_cuda.txt | grep -E "passed|failed|skipped|Error|^FAILED|^E " | head -30
throughput() {
  timeout 150 python3 bench/offline_throughput.py --model-path deepseek-v2-lite --load-format dummy \
    --skip-tokenizer-init --dataset random-ids --num-prompts 512 --random-input-len 512 \
    --random-output-len 128 --random-seed 0 "$@" 2>&1 | quiet | tail -3
}
for dp in 1 2 4; do
  mark "DeepSeek-V2-Lite TP=4, dp $dp"
  if [ $dp = 1 ]; then throughput --tp-size 4; else throughput --tp-size 4 --dp-size $dp --enable-dp-attention; fi \
    | tee $LOG/dp_serving_tp4_dp$dp.txt
done
mark "DeepSeek-V2-Lite TP=4, dp 4, CUDA graphs off"
throughput --tp-size 4 --dp-size 4 --enable-dp-attention --disable-cuda-graph | tee $LOG/dp_serving_tp4_dp4_eager.txt
mark done
