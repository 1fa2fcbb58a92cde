#!/usr/bin/env bash
# GPU run D, part 2, on a 2-GPU machine (nvidia-h100-x2): tensor parallelism on the Llama-3.1-8B config
# (issue #9): TP=1 references (one per GPU, side by side), then TP=2 greedy parity in bf16 and float32, decode with
# the NCCL time per step, offline throughput; then side by side: GPU 0 the 500-prompt SGLang setting (issue #5,
# with the overlap schedule), GPU 1 the TP=1 offline baseline, structured-output cost (issue #6) and the overlap
# schedule on the 1B preset with host stalls (issue #7).
#   bash bench/gpu/session_d2.sh     (GPU machine, repository root; wheels in .whl, tokenizer in .carry)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
P8B="--model-path llama-3.1-8b --load-format dummy --tokenizer-path $TOK --cuda-graph-max-bs 16"
TP_WORK="--dataset random-ids --num-prompts 200 --random-input-len 4096 --random-output-len 1024 --random-range-ratio 0"
(export CUDA_VISIBLE_DEVICES=0; timeout 90 python3 bench/tp_parity.py $P8B --tp-size 1 --out /tmp/tp1_bf16.json \
  2>&1 | quiet | tail -1) &
(export CUDA_VISIBLE_DEVICES=1; timeout 90 python3 bench/tp_parity.py $P8B --dtype float32 --tp-size 1 \
  --out /tmp/tp1_fp32.json 2>&1 | quiet | tail -1) &
wait
timeout 100 python3 bench/tp_parity.py $P8B --tp-size 2 --reference /tmp/tp1_bf16.json 2>&1 | quiet \
  | tee $LOG/tp_parity_8b_bf16.txt | tail -16
timeout 110 python3 bench/tp_parity.py $P8B --dtype float32 --tp-size 2 --reference /tmp/tp1_fp32.json 2>&1 \
  | quiet | tee $LOG/tp_parity_8b_fp32.txt | tail -16
timeout 120 python3 bench/overlap.py --model-path llama-3.1-8b --load-format dummy --skip-tokenizer-init \
  --batch-size 1 32 128 --tp-size 2 2>&1 | quiet | tee $LOG/overlap_8b_tp2.txt | tail -4
timeout 150 python3 bench/offline_throughput.py --model-path llama-3.1-8b --load-format dummy --skip-tokenizer-init \
  --tp-size 2 $TP_WORK 2>&1 | quiet | tee $LOG/offline_tp2.txt | tail -3
lane0() {
  timeout 260 python3 bench/offline_throughput.py --model-path llama-3.1-8b --load-format dummy \
    --skip-tokenizer-init --dataset random-ids --num-prompts 500 --random-input-len 4096 --random-output-len 2048 \
    --random-range-ratio 0 2>&1 | quiet | tee $LOG/offline_500.txt | tail -3
}
lane1() {
  timeout 150 python3 bench/offline_throughput.py --model-path llama-3.1-8b --load-format dummy \
    --skip-tokenizer-init $TP_WORK 2>&1 | quiet | tee $LOG/offline_tp1.txt | tail -3
  timeout 120 python3 bench/structured.py --model-path llama-3.1-8b --load-format dummy --tokenizer-path $TOK \
    --batch-size 32 --output-len 128 2>&1 | quiet | tee $LOG/structured.txt | tail -12
  for flag in "" "--disable-overlap-schedule"; do
    timeout 90 python3 bench/overlap.py --model-path llama-3.2-1b --load-format dummy --skip-tokenizer-init \
      --batch-size 1 32 64 128 $flag 2>&1 | quiet | tee -a $LOG/overlap_1b.txt | tail -5
  done
}
run_lanes
