#!/usr/bin/env bash
# GPU run H, part 5 (one H200, ~2 minutes): the one-launch FP8 KV store on CUDA (values equal to the torch store),
# the FP8 pool's saturation, the Triton backend over an FP8 pool against torch-native, checkpoint KV scales.
#   bash bench/gpu/session_h5.sh     (GPU machine, repository root; wheels in .whl)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/unit/test_kv_store.py tests/unit/test_triton_attention_fp8.py \
  -k "store or saturat or backend" 2>&1 | quiet | grep -E "passed|failed|^FAILED|^E " | head -20
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/parity/test_fp8_kv_scales.py -k llama_checkpoint 2>&1 \
  | quiet | grep -E "passed|failed|^FAILED|^E " | head -20
