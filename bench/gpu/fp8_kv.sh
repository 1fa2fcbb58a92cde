#!/usr/bin/env bash
# Issue #19, FP8 KV cache, on one H200 (~2 minutes): the FP8 attention-kernel tests compiled, GPU-sized shapes
# included (test_gpu_sizes: Llama-8B GQA and DeepSeek MLA at up to 20k keys, bf16 queries, both FP8 formats);
# the split-KV decode kernel over an FP8 cache against a bf16 one in CUDA graphs (bench/gpu/fp8_kv.py); and,
# where the embedded SmolLM2-135M is installed, its next-token accuracy with FP8 caches against a bf16 cache.
#   bash bench/gpu/fp8_kv.sh     (GPU machine, repository root; wheels in .whl)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
start=$(date +%s)
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/unit/test_triton_attention_fp8.py 2>&1 | tail -3
timeout 200 python3 bench/gpu/fp8_kv.py 2>&1 | quiet | tee $LOG/fp8_kv_decode.txt
if python3 -c "from radixlm.models.embedded import embedded_model_path; embedded_model_path()" 2>/dev/null; then
  timeout 200 python3 bench/fp8_kv_accuracy.py --device cuda --dtype bfloat16 2>&1 | quiet \
    | tee $LOG/fp8_kv_accuracy.txt | tail -5
else
  echo "embedded model not installed: accuracy bench skipped"
fi
echo "total $(( $(date +%s) - start )) s"
