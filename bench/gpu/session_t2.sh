#!/usr/bin/env bash
# GPU run T2 (one H200, ~7 minutes; issue #19): this commit's step changes (two-pass argmax, one launch for the
# graph inputs, allocation without kernels, the Gluon GEMV's launch from T1's sweep) tested on CUDA, then timed
# against the tree before them (.base: `mkdir .base && git archive e60fbf4 | tar -x -C .base`, carried) in the same
# call: the chained step's GPU work outside the graph, and Llama-3.1-8B batch 1, alternating trees.
#   bash bench/gpu/session_t2.sh      (GPU machine, repository root; carry .whl .base)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
cuda_tests 200 tests/unit/test_argmax.py tests/unit/test_gluon_gemv.py tests/unit/test_cuda_graph.py \
  tests/unit/test_sampling.py tests/unit/test_memory.py tests/unit/test_static_batch.py
timeout 60 python3 bench/gpu/argmax.py 2>&1 | quiet
PROFILE="--model-path llama-3.1-8b --load-format dummy --skip-tokenizer-init --cuda-graph-max-bs 1 --cases 1x160"
echo "-- chained timeline --quantization fp8"
timeout 100 python3 bench/decode_profile.py $PROFILE --chained-timeline --quantization fp8 2>&1 | quiet | grep -v INFO
base() { (cd .base && export PYTHONPATH=/tmp/site:$PWD && echo "-- base tree:" && llama_batch1 "$@"); }
for round in 1 2; do
  llama_batch1 --quantization fp8
  base --quantization fp8
  llama_batch1
  base
done
llama_batch1 --quantization fp8 --quantize-lm-head
