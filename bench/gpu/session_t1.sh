#!/usr/bin/env bash
# GPU run T1 (one H200, ~8 minutes; issue #19): where a chained batch-1 step's GPU time goes outside the CUDA
# graph (Llama-3.1-8B, online FP8 and bf16), and the Gluon GEMV's launches swept per projection (gate_up too).
#   bash bench/gpu/session_t1.sh      (GPU machine, repository root; carry .whl)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
PROFILE="--model-path llama-3.1-8b --load-format dummy --skip-tokenizer-init --cuda-graph-max-bs 1 --cases 1x160"
for q in "--quantization fp8" ""; do
  echo "-- chained timeline ${q:-bf16}"
  timeout 120 python3 bench/decode_profile.py $PROFILE --chained-timeline $q 2>&1 | quiet | grep -v INFO
done
llama_batch1 --quantization fp8
llama_batch1
timeout 330 python3 bench/gpu/gluon_gemv.py --sweep --shapes o qkv down gate_up 2>&1 | quiet \
  | tee $LOG/gluon_sweep_t1.txt | grep -E "^[a-z_]+ N=|Triton|bn= 64 st= 4 sub=1 split=4 pre= 2|best of"
