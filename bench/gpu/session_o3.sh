#!/usr/bin/env bash
# GPU run O3 (one H200, ~4 minutes; issue #19): what run O2 kept, measured alone against the tree before it.
# This tree: the rotary kernel storing K and V (bf16 and FP8 alike) and the FP8 decode GEMV preloading its first
# weight tile before its PDL wait (GemvConfig.preload = 1 by default); 493af32 unpacked in .base (`rm -rf .base
# && mkdir .base && git archive 493af32 radixlm bench/one_batch.py | tar -x -C .base`; carry .whl, .carry, .base).
# Tests on CUDA, then Llama-3.1-8B batch-1 decode, FP8 and bf16, two rounds alternating.
#   bash bench/gpu/session_o3.sh [quick]     (GPU machine, repository root; quick: one round)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/unit/test_fused_ops.py tests/unit/test_kv_store.py \
  tests/unit/test_fp8_kernels.py tests/parity/test_fp8_fused.py tests/unit/test_cuda_graph.py -k "not moe" 2>&1 \
  | quiet > $LOG/tests.txt
grep -E "^FAILED|^E  " $LOG/tests.txt | head -12; tail -1 $LOG/tests.txt
ARGS="--model-path llama-3.1-8b --load-format dummy --skip-tokenizer-init --input-len 128 --output-len 64 \
  --batch-size 1 --cuda-graph-max-bs 1"
one_batch() { timeout 60 python3 bench/one_batch.py $ARGS "$@" 2>&1 | quiet | grep -E "^ +[0-9]+ "; }
base_batch() { (cd .base && PYTHONPATH=/tmp/site:$PWD timeout 60 python3 bench/one_batch.py $ARGS "$@" 2>&1 \
  | quiet | grep -E "^ +[0-9]+ "); }
rounds=2; [ "${1:-}" = quick ] && rounds=1
for round in $(seq $rounds); do
  echo "-- $(date +%T) round $round: 493af32 online fp8"; base_batch --quantization fp8
  echo "-- $(date +%T) round $round: this tree online fp8"; one_batch --quantization fp8
  echo "-- $(date +%T) round $round: 493af32 bf16"; base_batch
  echo "-- $(date +%T) round $round: this tree bf16"; one_batch
done
echo "-- $(date +%T) this tree online fp8 + fp8_e4m3 KV"; one_batch --quantization fp8 --kv-cache-dtype fp8_e4m3
