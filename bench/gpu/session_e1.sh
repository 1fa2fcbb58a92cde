#!/usr/bin/env bash
# GPU run E, part 1 (one H200): issue #16's core on the GPU.  The Triton kernels at real shapes (custom-mask
# verification, MLA keys wider than values, bf16), the forward modes and the MLA model against HF with the Triton
# backend on CUDA, the scheduler's schedules (overlap, mixed chunks, pages, graphs, logprobs) agreeing on the GPU,
# then the attention kernels' timings (Llama-3.1-8B decode/extend and DeepSeek-V2-Lite MLA decode).
#   bash bench/gpu/session_e1.sh     (GPU machine, repository root; wheels in .whl, tokenizer in .carry)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
git log -1 --format=%h 2>/dev/null
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/unit/test_triton_attention.py \
  tests/unit/test_triton_attention_modes.py tests/unit/test_cuda_graph.py tests/parity/test_forward_modes.py \
  tests/parity/test_mla_model.py -k "triton or cuda or graph or gpu or decode or extend or mask or mla" 2>&1 \
  | tee $LOG/gpu_tests.txt | tail -15
timeout 150 python3 bench/attention_kernels.py 2>&1 | quiet | tee $LOG/attention_kernels.txt
