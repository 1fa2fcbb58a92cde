#!/usr/bin/env bash
# GPU run O2 (one H200; issue #19), two calls: `bash bench/gpu/session_o2.sh a` (~8 min: tests on CUDA,
# Llama-3.1-8B batch-1 decode, the tree before this run against this one, with and without the GEMV's pre-wait
# weight preload, bf16 and FP8) and `... b` (~6 min: the trees between, the FP8 layer with PDL and preload 0/1/2,
# one FP8 graph replay kernel by kernel).  Trees, alternating: 493af32 in .base (before this run); 633169d in .mid (the rotary
# kernel storing K and V: one launch instead of two, bf16 and FP8 alike); e52fa99 in .mid2 (+ the FP8 decode GEMV's
# epilogues: gate_up's SiLU-mul with down_proj's quantization, qkv's RoPE with the K/V store); this tree (+ the
# decode attention's last split merging, bf16 and FP8 alike); and this tree with preload 1 on all four
# projections (GemvConfig.preload through RADIXLM_GEMV_CONFIGS).
#   for t in base:493af32 mid:633169d mid2:e52fa99; do rm -rf .${t%:*} && mkdir .${t%:*} && git archive ${t#*:}
#   radixlm bench/one_batch.py | tar -x -C .${t%:*}; done     (carry .whl, .carry, .base, .mid, .mid2)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
part=${1:-a}
ARGS="--model-path llama-3.1-8b --load-format dummy --skip-tokenizer-init --input-len 128 --output-len 64 \
  --batch-size 1 --cuda-graph-max-bs 1"
one_batch() { timeout 60 python3 bench/one_batch.py $ARGS "$@" 2>&1 | quiet | grep -E "^ +[0-9]+ "; }
tree_batch() { local tree=$1; shift; (cd $tree && PYTHONPATH=/tmp/site:$PWD timeout 60 python3 bench/one_batch.py \
  $ARGS "$@" 2>&1 | quiet | grep -E "^ +[0-9]+ "); }
for p in 1 2; do python3 - "$p" > $LOG/preload$p.json <<'PY'
import json, sys, torch
from radixlm.kernels.fp8_gemv import default_gemv_config
sms = torch.cuda.get_device_properties(0).multi_processor_count
shapes = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # Llama-3.1-8B qkv, o, gate_up, down
print(json.dumps({f"{n},{k}": list(default_gemv_config(n, k, sms)._replace(preload=int(sys.argv[1])))
                  for n, k in shapes}))
PY
done
if [ "$part" = a ]; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/unit/test_fused_ops.py tests/unit/test_kv_store.py \
    tests/unit/test_fused_quant.py tests/unit/test_fp8_kernels.py tests/parity/test_fp8_fused.py \
    tests/unit/test_fp8_gemv_epilogues.py tests/unit/test_triton_attention.py \
    -k "rotary or store or gemv or fused_model or epilogue or decode" 2>&1 | quiet | grep -E "passed|failed|^FAILED|^E  " | head -12
  for round in 1 2; do
    echo "-- $(date +%T) round $round: 493af32 online fp8"; tree_batch .base --quantization fp8
    echo "-- $(date +%T) round $round: this tree online fp8"; one_batch --quantization fp8
    echo "-- $(date +%T) round $round: this tree online fp8, preload 1"
    RADIXLM_GEMV_CONFIGS=$LOG/preload1.json one_batch --quantization fp8
  done
  echo "-- $(date +%T) 493af32 bf16"; tree_batch .base
  echo "-- $(date +%T) this tree bf16"; one_batch
else  # where the gain comes from, and the layer with preload 0/1/2
  timeout 80 python3 bench/gpu/fp8_gemm.py --pdl --tokens 1 --shapes llama8b-qkv llama8b-o llama8b-gate_up \
    llama8b-down 2>&1 | quiet | head -14
  for round in 1 2; do
    echo "-- $(date +%T) round $round: 633169d online fp8"; tree_batch .mid --quantization fp8
    echo "-- $(date +%T) round $round: e52fa99 online fp8"; tree_batch .mid2 --quantization fp8
  done
  echo "-- $(date +%T) 633169d bf16"; tree_batch .mid
  echo "-- $(date +%T) replay kernels, online fp8"
  timeout 90 python3 bench/decode_profile.py --model-path llama-3.1-8b --load-format dummy --skip-tokenizer-init \
    --cases 1x256 --replay-kernels --quantization fp8 2>&1 | quiet | grep -v "^\s*$" | head -40
fi
