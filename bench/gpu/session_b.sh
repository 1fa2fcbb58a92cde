#!/usr/bin/env bash
# GPU run B: where decode time goes, the server on the GPU, and the peer (HF transformers) on the same card:
# batch-1 decode with a static cache, and continuous batching next to radixlm on the same prompts.
#   bash bench/gpu/session_b.sh     (GPU machine, repository root, wheels in .whl; logs under $OUT)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
LOG=${OUT:-/tmp}
timeout 70 python3 bench/decode_profile.py --model-path llama-3.1-8b --load-format dummy \
  --cases 1x256 128x2048 2>&1 | grep -v "^USDT\|^\[scheduler\|Warning" | tee $LOG/decode_profile.txt
# The HTTP server on the GPU (small preset: quick to load): token ids in, token ids out.
python3 -m radixlm.serve --model-path llama-3.2-1b --load-format dummy --skip-tokenizer-init --port 30000 \
  --cuda-graph-max-bs 8 > $LOG/server.log 2>&1 &
for i in $(seq 1 45); do curl -sf localhost:30000/health >/dev/null && break; sleep 1; done
curl -s localhost:30000/generate -H 'content-type: application/json' \
  -d '{"input_ids": [[1, 2, 3, 4], [5, 6, 7]], "sampling_params": {"max_new_tokens": 8, "temperature": 0}}' \
  | tee $LOG/server_reply.json
echo
kill %1; wait
tail -3 $LOG/server.log
timeout 260 python3 bench/offline_throughput.py --model-path llama-3.1-8b --load-format dummy --skip-tokenizer-init \
  --dataset random-ids --num-prompts 64 --random-input-len 4096 --random-output-len 512 --random-range-ratio 0 \
  --hf --hf-generate-prompts 0 2>&1 | tee $LOG/offline_pair.txt | grep -v "it/s\]" | tail -5
timeout 150 python3 bench/hf_batch1.py --model-path llama-3.1-8b --input-len 128 --output-len 128 2>&1 \
  | tee $LOG/hf_batch1.txt | tail -2
