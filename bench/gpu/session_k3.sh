#!/usr/bin/env bash
# GPU run K3 (one H200, ~9 minutes): online FP8's decode activations in 128-channel groups (the SiLU-mul fuses
# its quantizer, the GEMV scales each K tile) and the decode attention's merge writing the o projection's input
# quantized.  Tests on CUDA, then Llama-3.1-8B batch 1 / 32 against the tree before (bccc332, unpacked into .base:
# `rm -rf .base && mkdir .base && git archive bccc332 radixlm bench/one_batch.py | tar -x -C .base`; carry it),
# alternating, and one FP8 graph replay kernel by kernel.
#   bash bench/gpu/session_k3.sh     (GPU machine, repository root; carry .whl, .carry and .base)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/unit/test_fp8_kernels.py tests/unit/test_fused_quant.py \
  tests/parity/test_fp8_fused.py tests/parity/test_fp8.py 2>&1 | quiet | grep -E "passed|failed|^FAILED|^E " | head -20
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/unit/test_triton_attention.py tests/unit/test_cuda_graph.py \
  -k "decode or graph or quantized" 2>&1 | quiet | grep -E "passed|failed|^FAILED|^E " | head -12
ARGS="--model-path llama-3.1-8b --load-format dummy --skip-tokenizer-init --input-len 128 --output-len 64"
one_batch() { timeout 70 python3 bench/one_batch.py $ARGS "$@" 2>&1 | quiet | grep -E "KV cache|^ +[0-9]+ "; }
base_batch() { (cd .base && PYTHONPATH=/tmp/site:$PWD timeout 70 python3 bench/one_batch.py $ARGS "$@" 2>&1 | quiet \
  | grep -E "^ +[0-9]+ "); }
for round in 1 2; do
  echo "-- round $round: bccc332 online fp8"; base_batch --batch-size 1 --quantization fp8
  echo "-- round $round: this tree online fp8"; one_batch --batch-size 1 --quantization fp8
done
echo "-- this tree bf16"; one_batch --batch-size 1 32
echo "-- this tree online fp8"; one_batch --batch-size 1 32 --quantization fp8
echo "-- this tree online fp8 + fp8_e4m3 KV"; one_batch --batch-size 1 32 --quantization fp8 --kv-cache-dtype fp8_e4m3
echo "-- replay kernels, online fp8"
timeout 90 python3 bench/decode_profile.py --model-path llama-3.1-8b --load-format dummy --skip-tokenizer-init \
  --cases 1x256 --replay-kernels --quantization fp8 2>&1 | quiet | grep -v "^\s*$" | head -48
