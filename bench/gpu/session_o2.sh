#!/usr/bin/env bash
# GPU run O2 (one H200, ~9 minutes; issue #19): the rotary kernel storing K and V (one launch instead of rotary then
# K/V store; bf16 and FP8 alike) against the tree before it (493af32, unpacked into .base: `rm -rf .base && mkdir
# .base && git archive 493af32 radixlm bench/one_batch.py | tar -x -C .base`; carry it), and the FP8 decode GEMV
# requesting its first weight tiles before its PDL wait (GemvConfig.preload, RADIXLM_GEMV_CONFIGS; run O1's plan).
# Tests on CUDA; the layer with PDL and preload 0/1/2 (fp8_gemm.py --pdl); Llama-3.1-8B batch-1 decode, alternating.
#   bash bench/gpu/session_o2.sh     (GPU machine, repository root; carry .whl, .carry and .base)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/unit/test_fused_ops.py tests/unit/test_kv_store.py \
  tests/unit/test_fp8_kernels.py -k "rotary or store or gemv" 2>&1 | quiet | grep -E "passed|failed|^FAILED|^E  " | head -12
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/unit/test_cuda_graph.py tests/parity/test_fp8_fused.py \
  2>&1 | quiet | grep -E "passed|failed|^FAILED|^E  " | head -12
timeout 100 python3 bench/gpu/fp8_gemm.py --pdl --tokens 1 --shapes llama8b-qkv llama8b-o llama8b-gate_up \
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
base_batch() { (cd .base && PYTHONPATH=/tmp/site:$PWD timeout 60 python3 bench/one_batch.py $ARGS "$@" 2>&1 | quiet \
  | grep -E "^ +[0-9]+ "); }
for round in 1 2; do
  echo "-- round $round: 493af32 online fp8"; base_batch --quantization fp8
  echo "-- round $round: this tree online fp8"; one_batch --quantization fp8
  for p in 1 2; do echo "-- round $round: this tree online fp8, preload $p"
    RADIXLM_GEMV_CONFIGS=$LOG/preload$p.json one_batch --quantization fp8; done
done
echo "-- 493af32 bf16"; base_batch
echo "-- this tree bf16"; one_batch
