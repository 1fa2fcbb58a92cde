#!/usr/bin/env bash
# GPU run A: CUDA-graph test, roofline, static-batch latency, the server on the GPU, offline throughput on
# SGLang's H100 setting (500 prompts, input uniform in [1, 4096], output uniform in [1, 2048]).
#   bash bench/gpu/session_a.sh     (GPU machine, repository root, wheels in .whl; logs under $OUT)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
LOG=${OUT:-/tmp}
timeout 120 python3 -m pytest -q tests/unit/test_cuda_graph.py 2>&1 | tail -3
timeout 60 python3 bench/roofline.py 2>&1 | tee $LOG/roofline.txt
timeout 150 python3 bench/one_batch.py --model-path llama-3.1-8b --load-format dummy \
  --batch-size 1 8 32 64 128 256 --input-len 256 --output-len 16 2>&1 | tee $LOG/one_batch.txt | tail -8
# The HTTP server on the GPU (small preset: quick to load): token ids in, token ids out.
python3 -m radixlm.serve --model-path llama-3.2-1b --load-format dummy --skip-tokenizer-init --port 30000 \
  --cuda-graph-max-bs 8 > $LOG/server.log 2>&1 &
for i in $(seq 1 90); do curl -sf localhost:30000/health >/dev/null && break; sleep 1; done
curl -s localhost:30000/generate -H 'content-type: application/json' \
  -d '{"input_ids": [[1, 2, 3, 4], [5, 6, 7]], "sampling_params": {"max_new_tokens": 8, "temperature": 0}}'
echo
kill %1; wait
timeout 330 python3 bench/offline_throughput.py --model-path llama-3.1-8b --load-format dummy --skip-tokenizer-init \
  --dataset random-ids --num-prompts 500 --random-input-len 4096 --random-output-len 2048 --random-range-ratio 0 \
  2>&1 | tee $LOG/offline_500.txt | grep -v "it/s\]" | tail -6
