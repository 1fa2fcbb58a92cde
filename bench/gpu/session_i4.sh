#!/usr/bin/env bash
# GPU run I, part 4 (one H200, ~3 minutes): DeepSeek-V2-Lite prefill at batch 1 and 32, four and three times a
# process, this tree against 8d97666 (.base, as session_i3.sh unpacks it), this tree first: is the slower single-shot
# prefill I3 showed at this tree real?   bash bench/gpu/session_i4.sh   (carry .whl, .carry and .base)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
rows() { grep -E "^ +[0-9]+ "; }
one_batch() {
  local tree=$1; shift
  (cd $tree && PYTHONPATH=/tmp/site:$PWD timeout 90 python3 bench/one_batch.py --load-format dummy \
    --skip-tokenizer-init --input-len 128 --output-len 16 "$@" 2>&1 | quiet | rows | sed "s|^|$tree |")
}
for round in 1 2; do
  one_batch . --model-path deepseek-v2-lite --batch-size 1 1 1 1 32 32 32 --cuda-graph-max-bs 128
  one_batch .base --model-path deepseek-v2-lite --batch-size 1 1 1 1 32 32 32 --cuda-graph-max-bs 128
done
