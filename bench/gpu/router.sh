#!/usr/bin/env bash
# The router process (issue #21) on a 2-GPU machine (nvidia-h200-x2, ~7 minutes): two 8B-preset workers (dummy
# weights), one a GPU, behind `radixlm router`; a shared-prefix workload (16 groups x 32 prompts, a 2048-token
# system prompt each group, 64-token questions, 64 out, 64 in flight) sent to
#   1. one worker directly (the single-GPU baseline);
#   2. the router, --policy cache_aware (each group's prompts should stay on one worker: its radix cache hits);
#   3. the router, --policy round_robin (each group's prompts on both workers: each prefills every prefix);
#   4. the router, cache_aware again, a random workload (1024 in / 128 out, no shared prefix): the router's hop.
# Then the router's /metrics (decisions per worker) and each worker's /metrics cache line.
#   bash bench/gpu/router.sh     (GPU machine, repository root; wheels in .whl, tokenizer in .carry)
# Besides setup.sh's wheels, .whl must hold the router's client for Python 3.12 (pip download as setup.sh says):
# aiohttp 3.14.5, aiohappyeyeballs 2.7.1, aiosignal 1.4.0, attrs 26.1.0, frozenlist 1.8.0, multidict 7.2.1,
# propcache 0.5.4, yarl 1.25.1 (idna: in the image).
set -uo pipefail
source bench/gpu/setup.sh || exit 1
python3 -c "import aiohttp; print('aiohttp', aiohttp.__version__)" || { echo "aiohttp missing from .whl"; exit 1; }
start=$(date +%s)
mark() { echo "== $1 (at $(( $(date +%s) - start )) s)"; }
up() { for i in $(seq 1 180); do curl -sf localhost:$1/health >/dev/null && return 0; sleep 1; done; return 1; }
for gpu in 0 1; do
  CUDA_VISIBLE_DEVICES=$gpu python3 -m radixlm.serve --model-path llama-3.1-8b --load-format dummy \
    --skip-tokenizer-init --enable-metrics --port 3000$((gpu + 1)) --log-level warning > $LOG/worker$gpu.log 2>&1 &
done
up 30001 && up 30002 || { echo "workers did not start"; tail -20 $LOG/worker*.log; kill $(jobs -p); exit 1; }
mark "workers up"
shared() {
  timeout 150 python3 bench/serving.py --base-url http://127.0.0.1:$1 --tokenizer $TOK \
    --dataset generated-shared-prefix --gsp-num-groups 16 --gsp-prompts-per-group 32 \
    --gsp-system-prompt-len 2048 --gsp-question-len 64 --gsp-output-len 64 --max-concurrency 64 2>&1 | tail -9
}
router() {  # start a router with these flags on port 30000, wait for it
  python3 -m radixlm.cli router --worker-urls http://127.0.0.1:30001 http://127.0.0.1:30002 --port 30000 \
    --log-level warning "$@" > $LOG/router.log 2>&1 &
  ROUTER=$!
  up 30000 || { echo "router did not start"; cat $LOG/router.log; }
}
mark "1. one worker directly"; shared 30001 | tee $LOG/router_direct.txt
curl -s -XPOST localhost:30001/flush_cache >/dev/null
mark "2. router cache_aware"; router --policy cache_aware; shared 30000 | tee $LOG/router_cache_aware.txt
curl -s localhost:30000/metrics | grep -E "^radixlm_router_(decisions|retries)_total" | tee $LOG/router_metrics.txt
curl -s localhost:30000/flush_cache; echo
kill $ROUTER; wait $ROUTER 2>/dev/null
mark "3. router round_robin"; router --policy round_robin; shared 30000 | tee $LOG/router_round_robin.txt
curl -s localhost:30000/flush_cache >/dev/null
kill $ROUTER; wait $ROUTER 2>/dev/null
mark "4. router cache_aware, random 1024/128"; router --policy cache_aware
timeout 150 python3 bench/serving.py --base-url http://127.0.0.1:30000 --tokenizer $TOK --dataset random-ids \
  --num-prompts 256 --random-input-len 1024 --random-output-len 128 --max-concurrency 64 2>&1 | tail -9 \
  | tee $LOG/router_random.txt
kill $ROUTER; wait $ROUTER 2>/dev/null
for port in 30001 30002; do echo "worker $port:"; curl -s localhost:$port/metrics | grep -iE "cache.*(hit|token)" | head -4; done
kill $(jobs -p) 2>/dev/null; wait
mark done
