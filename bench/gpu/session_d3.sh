#!/usr/bin/env bash
# GPU run D, part 3, on a 2-GPU machine (nvidia-h100-x2), after the scheduler kept chaining decode steps past
# finished requests and a full KV pool, and the grammar mask kernel was compiled at startup: side by side,
#   GPU 0: the 500-prompt SGLang setting (issue #5);
#   GPU 1: structured-output cost (issue #6), the overlap schedule on the 1B and 8B presets (issue #7), the TP=1
#          offline baseline;
# then on both GPUs the TP=2 offline run and TP parity on the 1B preset (issue #9).
#   bash bench/gpu/session_d3.sh     (GPU machine, repository root; wheels in .whl, tokenizer in .carry)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
TP_WORK="--dataset random-ids --num-prompts 200 --random-input-len 4096 --random-output-len 1024 --random-range-ratio 0"
lane0() {
  timeout 260 python3 bench/offline_throughput.py --model-path llama-3.1-8b --load-format dummy \
    --skip-tokenizer-init --dataset random-ids --num-prompts 500 --random-input-len 4096 --random-output-len 2048 \
    --random-range-ratio 0 2>&1 | quiet | tee $LOG/offline_500.txt | tail -3
}
lane1() {
  timeout 120 python3 bench/structured.py --model-path llama-3.1-8b --load-format dummy --tokenizer-path $TOK \
    --batch-size 32 --output-len 128 2>&1 | quiet | tee $LOG/structured.txt | tail -12
  timeout 90 python3 bench/overlap.py --model-path llama-3.2-1b --load-format dummy --skip-tokenizer-init \
    --batch-size 1 32 64 128 2>&1 | quiet | tee $LOG/overlap_1b.txt | tail -5
  timeout 100 python3 bench/overlap.py --model-path llama-3.1-8b --load-format dummy --skip-tokenizer-init \
    --batch-size 1 32 128 2>&1 | quiet | tee $LOG/overlap_8b.txt | tail -4
  timeout 150 python3 bench/offline_throughput.py --model-path llama-3.1-8b --load-format dummy \
    --skip-tokenizer-init $TP_WORK 2>&1 | quiet | tee $LOG/offline_tp1.txt | tail -3
}
run_lanes
timeout 150 python3 bench/offline_throughput.py --model-path llama-3.1-8b --load-format dummy --skip-tokenizer-init \
  --tp-size 2 $TP_WORK 2>&1 | quiet | tee $LOG/offline_tp2.txt | tail -3
P1B="--model-path llama-3.2-1b --load-format dummy --tokenizer-path $TOK --cuda-graph-max-bs 16"
timeout 80 python3 bench/tp_parity.py $P1B --tp-size 1 --out /tmp/tp1_1b.json 2>&1 | quiet | tail -1
timeout 90 python3 bench/tp_parity.py $P1B --tp-size 2 --reference /tmp/tp1_1b.json 2>&1 | quiet \
  | tee $LOG/tp_parity_1b.txt | tail -16
