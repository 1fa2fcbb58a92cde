#!/usr/bin/env bash
# `radixlm serve --dp-size 2` of the embedded model on CPU (issue #21): for each router policy given (default:
# cache_aware round_robin), start the server, send a shared-prefix workload (4 groups x 8 prompts, a 256-token
# system prompt each group, 16-token questions, 8 out, 4 in flight) with bench/serving.py, then print each
# replica's prompt / cached token counters (their /metrics), the router's decisions per replica, and stop it
# with SIGTERM (its exit status).
#   PYTHONPATH=. bash bench/dp_replicas.sh [POLICY ...]       (repository root; PYTHON=... to pick the interpreter)
set -uo pipefail
PY=${PYTHON:-python3}
PORT=${PORT:-31800}
policies=("$@")
[ ${#policies[@]} -gt 0 ] || policies=(cache_aware round_robin)
for policy in "${policies[@]}"; do
  echo "== --router-policy $policy"
  $PY -m radixlm.serve --dp-size 2 --port $PORT --max-total-tokens 8192 --enable-metrics --log-level warning \
    --router-policy $policy > /tmp/dp_replicas_$policy.log 2>&1 &
  server=$!
  for i in $(seq 1 600); do curl -sf localhost:$PORT/health >/dev/null && break; sleep 1; done
  $PY bench/serving.py --base-url http://127.0.0.1:$PORT --backend radixlm --dataset generated-shared-prefix \
    --gsp-num-groups 4 --gsp-prompts-per-group 8 --gsp-system-prompt-len 256 --gsp-question-len 16 \
    --gsp-output-len 8 --max-concurrency 4 2>&1 | tail -9
  urls=$(curl -s localhost:$PORT/list_workers | $PY -c 'import json, sys
print(" ".join(w["url"] for w in json.load(sys.stdin)["workers"]))')
  for url in $urls; do
    echo "$url $(curl -s $url/metrics | grep -E '^radixlm:(prompt|cached)_tokens_total' | sed 's/{[^}]*}//' | tr '\n' ' ')"
  done
  curl -s localhost:$PORT/metrics | grep '^radixlm_router_decisions_total'
  kill -TERM $server; wait $server; echo "exit status $?"
done
