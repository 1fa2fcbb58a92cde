#!/usr/bin/env bash
# GPU run F, part 4 (one H200): DeepSeek-V2-Lite offline throughput against HF transformers on one saved random
# checkpoint (radixlm twice, the second run timed without Triton compiles; HF's continuous batching does not serve
# MLA, so its static batching: one left-padded generate), where a decode step's GPU time goes (V2-Lite, batch 1
# and 64), and static-batch decode of the Qwen3-30B-A3B preset.
#   bash bench/gpu/session_f4.sh     (GPU machine, repository root; wheels in .whl)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
CKPT=/tmp/deepseek-v2-lite-random
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
start=$(date +%s)
timeout 200 python3 bench/hf_models.py deepseek-v2-lite $CKPT 2>&1 | tail -1
timeout 200 python3 bench/offline_throughput.py --model-path $CKPT --skip-tokenizer-init --dataset random-ids \
  --num-prompts 64 --random-input-len 512 --random-output-len 128 --random-range-ratio 0.5 --repeat 2 --hf \
  --hf-padded-batch --hf-generate-prompts 0 2>&1 | quiet | grep -v "^\s*File\|^\s*\^\|^    " \
  | tee $LOG/offline_v2lite.txt | tail -8
timeout 120 python3 bench/gpu/decode_kernels.py --model-path deepseek-v2-lite --load-format dummy \
  --skip-tokenizer-init --batch-size 1 64 --input-len 512 2>&1 | quiet | tee $LOG/decode_kernels_v2lite.txt
timeout 120 python3 bench/one_batch.py --model-path qwen3-30b-a3b --load-format dummy --skip-tokenizer-init \
  --batch-size 1 64 --input-len 512 --output-len 64 --cuda-graph-max-bs 64 2>&1 | quiet \
  | tee $LOG/one_batch_qwen3moe.txt | tail -4
echo "total $(( $(date +%s) - start )) s"
