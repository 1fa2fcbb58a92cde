#!/usr/bin/env bash
# GPU run F, part 2 (one H200): issue #18's MLA.  The MLA kernels' and model's GPU tests (split plan, decompressed
# extend on Triton), the MLA bench (decode kernel vs copy bandwidth at V2-Lite and V3 head counts, absorbed vs
# non-absorbed decode, absorbed vs decompressed extend and the crossover), the DeepSeek-V2-Lite roofline, and
# radixlm's static-batch decode on the V2-Lite preset (random weights).
#   bash bench/gpu/session_f2.sh     (GPU machine, repository root; wheels in .whl)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/unit/test_triton_attention_modes.py \
  tests/parity/test_mla_model.py -k "gpu or cuda or triton" 2>&1 | quiet | tee $LOG/mla_tests.txt | tail -6
timeout 300 python3 bench/gpu/mla.py 2>&1 | quiet | tee $LOG/mla.txt
timeout 60 python3 bench/roofline.py --model-path deepseek-v2-lite --batch-size 1 8 32 64 128 256 --kv-len 1024 \
  2>&1 | quiet | tee $LOG/roofline_v2lite.txt
timeout 150 python3 bench/one_batch.py --model-path deepseek-v2-lite --load-format dummy --skip-tokenizer-init \
  --batch-size 1 32 128 --input-len 128 --output-len 128 --cuda-graph-max-bs 128 2>&1 | quiet \
  | tee $LOG/one_batch_v2lite.txt | tail -8
