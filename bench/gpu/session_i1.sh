#!/usr/bin/env bash
# GPU run I, part 1 (one H200, ~6 minutes), at the commit that added it: the decode GEMV quantizing its own input
# (no quantizer launch at M <= 16; measured, then reverted: see docs/benchmarks.md, run I).  First whether a garbage
# collection that frees an old CUDA graph in the middle of a capture invalidates it (a suspected cause of run H5's
# failure: it does not), then the tests on CUDA (the checkpoint-scale test twice), the fused GEMV table,
# Llama-3.1-8B batch 1 / 32 in bf16, online FP8 and FP8 + FP8 KV, and the kernels of one FP8 batch-1 decode step.
#   bash bench/gpu/session_i1.sh     (GPU machine, repository root; wheels in .whl)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
start=$(date +%s)
mark() { echo "== $1 (at $(( $(date +%s) - start )) s)"; }
LLAMA="--model-path llama-3.1-8b --load-format dummy --skip-tokenizer-init"
rows() { grep -E "KV cache| batch|^ +[0-9]+ "; }
mark "a collection during a capture, unprotected"
timeout 60 python3 - <<'PY' 2>&1 | tail -3
import gc
import torch

def old_graph_in_a_cycle():
    x = torch.zeros(1 << 20, device="cuda")
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        x.add_(1)
    box = {"g": g, "x": x}
    box["self"] = box

x = torch.zeros(8, device="cuda")
old_graph_in_a_cycle()
gc.set_threshold(1, 1, 1)
try:
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, capture_error_mode="thread_local"):
        for _ in range(50):
            x.add_(torch.ones(8, device="cuda"))
    g.replay()
    torch.cuda.synchronize()
    print("unprotected capture survived:", x.tolist()[:2])
except Exception as e:
    print("unprotected capture failed:", type(e).__name__, str(e).splitlines()[0][:200])
PY
mark tests
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/unit/test_cuda_graph.py tests/unit/test_fp8_kernels.py \
  tests/parity/test_fp8.py -k "gemv or real_shapes or cuda" 2>&1 | quiet \
  | tee $LOG/i1_tests.txt | grep -E "passed|failed|Error|^FAILED|^E " | head -20
for i in 1 2; do
  timeout 100 python3 -m pytest -q -p no:cacheprovider tests/parity/test_fp8_kv_scales.py -k "checkpoint and cuda" \
    2>&1 | quiet | tee $LOG/i1_kv_scales_$i.txt | grep -E "passed|failed|^FAILED|^E " | head -8
done
mark "fused GEMV table"
timeout 150 python3 bench/gpu/fp8_gemm.py --fused-gemv --tokens 1 16 --shapes llama8b-qkv llama8b-o llama8b-gate_up \
  llama8b-down 2>&1 | quiet | tee $LOG/i1_gemv.txt
mark "llama batch 1 and 32"
for q in "" "--quantization fp8" "--quantization fp8 --kv-cache-dtype fp8_e4m3"; do
  echo "-- flags: ${q:-bf16}"
  timeout 60 python3 bench/one_batch.py $LLAMA --batch-size 1 32 --input-len 128 --output-len 128 $q 2>&1 \
    | quiet | rows
done
mark "kernels of an FP8 batch-1 decode step"
timeout 90 python3 bench/decode_profile.py $LLAMA --quantization fp8 --cases 1x256 2>&1 | quiet | tail -32
mark done
