#!/usr/bin/env bash
# GPU run I, part 3 (one H200, ~6 minutes): issue #20's measurements on one GPU.
# 1. The data-parallel attention code path at --tp-size 1 costs nothing: bench/one_batch.py at this tree against
#    the tree before any of it (8d97666, unpacked into .base by the line below and carried), alternating,
#    DeepSeek-V2-Lite and Llama-3.1-8B (dummy weights) at batch 1 and 32.
# 2. The memory model's check: bench/dp_memory.py --check (ModelRunner at tp 1 on DeepSeek-V3 cut to 5 layers,
#    block FP8, against the prediction from the meta-device model and the pool rule), then its layout table.
#   rm -rf .base && mkdir .base && git archive 8d97666 radixlm bench/one_batch.py | tar -x -C .base
#   bash bench/gpu/session_i3.sh     (GPU machine, repository root; carry .whl, .carry and .base)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
start=$(date +%s)
mark() { echo "== $1 (at $(( $(date +%s) - start )) s)"; }
rows() { grep -E "^ +[0-9]+ "; }
one_batch() {  # tree (. or .base), then one_batch flags
  local tree=$1; shift
  (cd $tree && PYTHONPATH=/tmp/site:$PWD timeout 90 python3 bench/one_batch.py --load-format dummy \
    --skip-tokenizer-init --input-len 128 --output-len 64 "$@" 2>&1 | quiet | rows | sed "s|^|$tree |")
}
for model in "deepseek-v2-lite --batch-size 1 32 --cuda-graph-max-bs 128" "llama-3.1-8b --batch-size 1 32"; do
  mark "$model: tree, then batch input prefill-ms prefill-tok/s decode-ms decode-tok/s"
  for round in 1 2; do
    one_batch .base --model-path $model
    one_batch . --model-path $model
  done
done
mark "memory model check"
timeout 240 python3 bench/dp_memory.py --model-path deepseek-v3 --fp8-blocks --check --check-layers 5 2>&1 | quiet \
  | tail -12
mark done
