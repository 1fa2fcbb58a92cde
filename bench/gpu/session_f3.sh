#!/usr/bin/env bash
# GPU run F, part 3 (one H200): DeepSeek-V2-Lite (15.7B, 2.4B active; bf16 random weights) end to end against HF
# transformers on one saved checkpoint, same call: batch-1 decode and static batches (radixlm), HF generate with a
# static cache (dynamic if that fails), and offline throughput (radixlm Engine vs HF generate_batch).
#   bash bench/gpu/session_f3.sh     (GPU machine, repository root; wheels in .whl)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
CKPT=/tmp/deepseek-v2-lite-random
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
start=$(date +%s)
timeout 200 python3 bench/hf_models.py deepseek-v2-lite $CKPT 2>&1 | tail -1
echo "checkpoint saved in $(( $(date +%s) - start )) s"; du -sh $CKPT
timeout 150 python3 bench/one_batch.py --model-path $CKPT --skip-tokenizer-init --batch-size 1 8 64 \
  --input-len 128 --output-len 128 --cuda-graph-max-bs 64 2>&1 | quiet | tee $LOG/one_batch_v2lite.txt | tail -5
timeout 150 python3 bench/offline_throughput.py --model-path $CKPT --skip-tokenizer-init --dataset random-ids \
  --num-prompts 64 --random-input-len 512 --random-output-len 128 --random-range-ratio 0.5 --hf \
  --hf-generate-prompts 1 2>&1 | quiet | tee $LOG/offline_v2lite.txt | tail -8
timeout 150 python3 bench/hf_batch1.py --model-path $CKPT --input-len 128 --output-len 64 2>&1 | quiet \
  | tee $LOG/hf_batch1_v2lite.txt | tail -3 | grep -q "tok/s" \
  || timeout 90 python3 bench/hf_batch1.py --model-path $CKPT --input-len 128 --output-len 64 --cache dynamic \
  2>&1 | quiet | tee $LOG/hf_batch1_v2lite_dynamic.txt | tail -3
echo "total $(( $(date +%s) - start )) s"
