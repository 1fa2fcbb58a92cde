#!/usr/bin/env bash
# GPU run O1 (one H200, ~6 minutes; issue #19): the FP8 decode GEMV requesting its first weight tiles before
# its PDL wait (GemvConfig.preload, 0 by default until measured).  The GEMV tests on CUDA; the layer as served
# with PDL off / on / on + preload 1 / 2 (bench/gpu/fp8_gemm.py --pdl); then Llama-3.1-8B online FP8 batch-1
# decode with the default launches against preload 1 and 2 on all four projections (RADIXLM_GEMV_CONFIGS),
# alternating, and bf16 once for the ratio.
#   bash bench/gpu/session_o1.sh     (GPU machine, repository root; carry .whl and .carry)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/unit/test_fp8_kernels.py -k "gemv" 2>&1 | quiet \
  | grep -E "passed|failed|^FAILED|^E  " | head -12
timeout 150 python3 bench/gpu/fp8_gemm.py --pdl --tokens 1 --shapes llama8b-qkv llama8b-o llama8b-gate_up \
  llama8b-down 2>&1 | quiet | head -14
for p in 1 2; do python3 - "$p" > $LOG/preload$p.json <<'PY'
import json, sys, torch
from radixlm.kernels.fp8_gemv import default_gemv_config
sms = torch.cuda.get_device_properties(0).multi_processor_count
shapes = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # Llama-3.1-8B qkv, o, gate_up, down
print(json.dumps({f"{n},{k}": list(default_gemv_config(n, k, sms)._replace(preload=int(sys.argv[1])))
                  for n, k in shapes}))
PY
done
ARGS="--model-path llama-3.1-8b --load-format dummy --skip-tokenizer-init --input-len 128 --output-len 64 \
  --batch-size 1 --cuda-graph-max-bs 1"
one_batch() { timeout 60 python3 bench/one_batch.py $ARGS "$@" 2>&1 | quiet | grep -E "^ +[0-9]+ "; }
for round in 1 2; do
  echo "-- round $round: online fp8, defaults"; one_batch --quantization fp8
  for p in 1 2; do echo "-- round $round: online fp8, preload $p"
    RADIXLM_GEMV_CONFIGS=$LOG/preload$p.json one_batch --quantization fp8; done
done
echo "-- bf16"; one_batch
