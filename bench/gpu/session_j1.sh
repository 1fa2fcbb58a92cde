#!/usr/bin/env bash
# GPU run J1 (one H200, ~8 minutes): programmatic dependent launch (kernels/pdl.py) for the FP8 quantizers and the
# decode GEMV, with the GEMV's L2 prefetch of its weight, and the one-launch K/V store (kernels/kv_store.py).
# 1. tests on CUDA: the FP8 kernels (incl. the PDL chain), the FP8 MLA products (fixed in 506b979, not yet rerun
#    on a GPU), the K/V store, CUDA-graph decode;  2. the FP8 layer with PDL / prefetch off and on;
# 3. Llama-3.1-8B batch 1 / 32: bf16, online FP8, FP8 + FP8 KV; FP8 with RADIXLM_DISABLE_PDL=1; and FP8 on the tree
#    before this run (.base: `git archive 69e079f radixlm bench/one_batch.py`), in the same call.
#   bash bench/gpu/session_j1.sh     (GPU machine, repository root; carry .whl, .carry and .base)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/unit/test_fp8_kernels.py tests/unit/test_fp8_bmm.py \
  2>&1 | quiet | grep -E "passed|failed|^FAILED|^E " | head -20
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/unit/test_kv_store.py tests/unit/test_cuda_graph.py \
  tests/unit/test_triton_attention_fp8.py -k "store or latent or argument or backend or graph or agree" 2>&1 \
  | quiet | grep -E "passed|failed|^FAILED|^E " | head -12
timeout 150 python3 bench/gpu/fp8_gemm.py --pdl --shapes llama8b-qkv llama8b-o llama8b-gate_up llama8b-down \
  --tokens 1 16 2>&1 | quiet | grep -v "^total"
one_batch() {  # flags...
  timeout 60 python3 bench/one_batch.py --model-path llama-3.1-8b --load-format dummy --skip-tokenizer-init \
    --batch-size 1 32 --input-len 128 --output-len 64 "$@" 2>&1 | quiet | grep -E "KV cache|^ +[0-9]+ "
}
for q in "" "--quantization fp8" "--quantization fp8 --kv-cache-dtype fp8_e4m3"; do
  echo "-- flags: ${q:-bf16}"; one_batch $q
done
echo "-- flags: --quantization fp8, RADIXLM_DISABLE_PDL=1"; RADIXLM_DISABLE_PDL=1 one_batch --quantization fp8
echo "-- flags: --quantization fp8, tree 69e079f"; (cd .base && PYTHONPATH=/tmp/site:$PWD one_batch --quantization fp8)
