#!/usr/bin/env bash
# GPU run C (planned for the next session): the peers on identical weights with the roofline in the same call
# (issue #5), the attention kernels alone, the overlap schedule on and off (issue #7).
#   bash bench/gpu/session_c.sh     (GPU machine, repository root, wheels in .whl; logs under $OUT)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
LOG=${OUT:-/tmp}
CKPT=/tmp/llama-3.1-8b-random
timeout 60 python3 bench/roofline.py 2>&1 | tee $LOG/roofline.txt
timeout 90 python3 bench/attention_kernels.py 2>&1 | tee $LOG/attention_kernels.txt
timeout 150 python3 bench/hf_models.py llama-3.1-8b $CKPT 2>&1 | tail -1
for flag in "" "--disable-overlap-schedule"; do
  timeout 150 python3 bench/overlap.py --model-path llama-3.2-1b --load-format dummy --batch-size 1 32 64 128 \
    $flag 2>&1 | tee -a $LOG/overlap_1b.txt | tail -5
  timeout 150 python3 bench/overlap.py --model-path $CKPT --skip-tokenizer-init --batch-size 1 32 128 \
    $flag 2>&1 | tee -a $LOG/overlap_8b.txt | tail -4
done
timeout 150 python3 bench/hf_batch1.py --model-path $CKPT --input-len 128 --output-len 128 2>&1 | tail -1
timeout 300 python3 bench/offline_throughput.py --model-path $CKPT --skip-tokenizer-init \
  --dataset random-ids --num-prompts 64 --random-input-len 4096 --random-output-len 512 --random-range-ratio 0 \
  --hf --hf-generate-prompts 0 2>&1 | tee $LOG/offline_pair.txt | grep -v "it/s\]" | tail -4
