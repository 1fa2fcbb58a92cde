#!/usr/bin/env bash
# GPU run E, part 2 (one H200): no regression after issue #16's reshaping, and mixed chunks under load.
#   1. roofline; batch-1 decode of radixlm (static batch, decode steps chained on the device) and of HF
#      transformers (static cache) on one saved random Llama-3.1-8B checkpoint, same call;
#   2. SGLang's 500-prompt offline setting (8B preset, random weights);
#   3. online serving, 8B preset: random 1024 in / 256 out at 16 req/s, with and without --enable-mixed-chunk
#      (ITL p99 and TTFT p50: prefills interrupting decodes), at the default chunk size and at 2048.
#   bash bench/gpu/session_e2.sh [a][s][b]   (GPU machine, repository root; wheels in .whl, tokenizer in .carry)
# Part a runs 1, s runs 3, b runs 2 (a + s, or b, fit one 10-minute call); no argument runs all.
set -uo pipefail
PART=${1:-asb}
source bench/gpu/setup.sh || exit 1
CKPT=/tmp/llama-3.1-8b-random
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
serve() {  # serve the 8B preset with extra flags, run the load, stop
  python3 -m radixlm.serve --model-path llama-3.1-8b --load-format dummy --skip-tokenizer-init --port 30000 \
    --log-level warning "$@" > $LOG/server.log 2>&1 &
  for i in $(seq 1 120); do curl -sf localhost:30000/health >/dev/null && break; sleep 1; done
  timeout 150 python3 bench/serving.py --tokenizer $TOK --dataset random-ids --num-prompts 400 \
    --random-input-len 1024 --random-output-len 256 --random-range-ratio 1 --request-rate 16 2>&1 | tail -9
  kill %1; wait
}
if [[ $PART == *a* ]]; then
timeout 60 python3 bench/roofline.py 2>&1 | quiet | tee $LOG/roofline.txt
timeout 120 python3 bench/hf_models.py llama-3.1-8b $CKPT 2>&1 | tail -1
timeout 120 python3 bench/one_batch.py --model-path $CKPT --skip-tokenizer-init --batch-size 1 32 128 \
  --input-len 128 --output-len 128 --cuda-graph-max-bs 128 2>&1 | quiet | tee $LOG/one_batch.txt | tail -5
timeout 150 python3 bench/hf_batch1.py --model-path $CKPT --input-len 128 --output-len 128 2>&1 | quiet \
  | tee $LOG/hf_batch1.txt | tail -2
fi
if [[ $PART == *s* ]]; then
echo "== serving, chunked prefill 8192 (default), no mixed chunks"; serve | tee $LOG/serving_plain.txt
echo "== serving, --enable-mixed-chunk"; serve --enable-mixed-chunk | tee $LOG/serving_mixed.txt
echo "== serving, --chunked-prefill-size 2048"; serve --chunked-prefill-size 2048 | tee $LOG/serving_plain_2048.txt
echo "== serving, --enable-mixed-chunk --chunked-prefill-size 2048"
serve --enable-mixed-chunk --chunked-prefill-size 2048 | tee $LOG/serving_mixed_2048.txt
fi
[[ $PART == *b* ]] || exit 0
timeout 280 python3 bench/offline_throughput.py --model-path llama-3.1-8b --load-format dummy --skip-tokenizer-init \
  --dataset random-ids --num-prompts 500 --random-input-len 4096 --random-output-len 2048 --random-range-ratio 0 \
  2>&1 | quiet | tee $LOG/offline_500.txt | tail -4
