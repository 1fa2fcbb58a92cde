#!/usr/bin/env bash
# GPU run R3 (one H200, ~4 minutes; issue #19): R2 found the norm that quantizes per token, with a 4096-wide row
# in one program (fused_quant._CHUNK 16384), off the plain norm + quantizer in some rows' bits
# (test_real_shapes_on_gpu[16384-None-300]).  Both norms now compile without FP contraction
# (fused_ops.NORM_LAUNCH): the norm and quantizer tests on CUDA, then a Llama-3.1-8B batch-1 step against the tree
# before (.base, unpacked from `git archive c8f8346 radixlm`) to see that the norms lost no speed.
#   bash bench/gpu/session_r3.sh      (GPU machine, repository root; carry .whl, .base)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/unit/test_fused_quant.py tests/unit/test_fused_ops.py \
  tests/parity/test_fp8_fused.py 2>&1 | quiet > $LOG/tests.txt
grep -E "^FAILED|^E  .*differ" $LOG/tests.txt | head -12; tail -1 $LOG/tests.txt
for round in 1 2; do
  for tree in .base .; do
    echo "tree $tree"
    (cd $tree && PYTHONPATH=/tmp/site:$PWD llama_batch1 --quantization fp8; PYTHONPATH=/tmp/site:$PWD llama_batch1)
  done
done
