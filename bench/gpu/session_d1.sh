#!/usr/bin/env bash
# GPU run D, part 1, on a 2-GPU machine (nvidia-h100-x2): tensor parallelism smoke test and parity on the 1B
# preset (both GPUs), then two single-GPU lanes side by side (CUDA_VISIBLE_DEVICES):
#   GPU 0: roofline, then HF transformers and radixlm on identical weights (a saved random checkpoint): the
#          offline pair, batch-1 decode (issue #5);
#   GPU 1: attention kernels, the overlap schedule on/off on the 1B preset (issue #7), structured-output cost
#          (issue #6).  (Part 2 makes its own TP=1 references.)
#   bash bench/gpu/session_d1.sh     (GPU machine, repository root; wheels in .whl, tokenizer in .carry)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
CKPT=/tmp/llama-3.1-8b-random
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
nvidia-smi topo -m | head -4
git log -1 --format=%h 2>/dev/null

P1B="--model-path llama-3.2-1b --load-format dummy --tokenizer-path $TOK --cuda-graph-max-bs 16"
timeout 90 python3 bench/tp_parity.py $P1B --tp-size 1 --out /tmp/tp1_1b.json 2>&1 | quiet | tail -2
timeout 110 python3 bench/tp_parity.py $P1B --tp-size 2 --reference /tmp/tp1_1b.json 2>&1 | quiet \
  | tee $LOG/tp_parity_1b.txt | tail -16

lane0() {
  timeout 60 python3 bench/roofline.py 2>&1 | quiet | tee $LOG/roofline.txt
  timeout 120 python3 bench/hf_models.py llama-3.1-8b $CKPT 2>&1 | tail -1
  timeout 260 python3 bench/offline_throughput.py --model-path $CKPT --skip-tokenizer-init \
    --dataset random-ids --num-prompts 64 --random-input-len 4096 --random-output-len 512 --random-range-ratio 0 \
    --hf --hf-generate-prompts 0 2>&1 | quiet | tee $LOG/offline_pair.txt | tail -4
  timeout 150 python3 bench/hf_batch1.py --model-path $CKPT --input-len 128 --output-len 128 2>&1 | quiet \
    | tee $LOG/hf_batch1.txt | tail -1
  timeout 110 python3 bench/overlap.py --model-path $CKPT --skip-tokenizer-init --batch-size 1 32 128 2>&1 \
    | quiet | tee $LOG/overlap_8b_ckpt.txt | tail -4
}
lane1() {
  timeout 90 python3 bench/attention_kernels.py 2>&1 | quiet | tee $LOG/attention_kernels.txt
  for flag in "" "--disable-overlap-schedule"; do
    timeout 90 python3 bench/overlap.py --model-path llama-3.2-1b --load-format dummy --skip-tokenizer-init \
      --batch-size 1 32 64 128 $flag 2>&1 | quiet | tee -a $LOG/overlap_1b.txt | tail -5
  done
  timeout 120 python3 bench/structured.py --model-path llama-3.1-8b --load-format dummy --tokenizer-path $TOK \
    --batch-size 32 --output-len 128 2>&1 | quiet | tee $LOG/structured.txt | tail -12
  timeout 100 python3 bench/overlap.py --model-path llama-3.1-8b --load-format dummy --skip-tokenizer-init \
    --batch-size 1 32 128 --disable-overlap-schedule 2>&1 | quiet | tee $LOG/overlap_8b_off.txt | tail -4
}
run_lanes
