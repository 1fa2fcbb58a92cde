#!/usr/bin/env bash
# GPU run R1 (one H200, ~7 minutes; issue #19): why the quantizing norms cost ~0.9 us more than the plain ones in
# a batch-1 FP8 step (run Q4: 2.27 / 2.66 against 1.38 / 1.70 us a layer).  The fused norm and SiLU-mul
# quantizers at 1024 columns a program (served: a 4096-wide row over four programs, each reading the whole row for
# the statistic and its chunk again) and at one program a row (4096: the norms, which then quantize the row they
# read without reading it again; 16384: SiLU-mul too), beside the producers without quantization; then a
# Llama-3.1-8B batch-1 step at each fused_quant._CHUNK (edited in this machine's copy), bf16 between, two rounds.
#   bash bench/gpu/session_r1.sh      (GPU machine, repository root; carry .whl)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/unit/test_fused_quant.py 2>&1 | quiet | tail -2
timeout 120 python3 bench/gpu/fused_quant.py --chunks 1024 4096 16384 2>&1 | grep -v Warning
chunk() { sed -i "s/^_CHUNK = .*/_CHUNK = $1/" radixlm/kernels/fused_quant.py; echo "_CHUNK $1"; }
for round in 1 2; do
  for c in 1024 4096 16384; do chunk $c; llama_batch1 --quantization fp8; done
  llama_batch1
done
for c in 4096 16384; do chunk $c; llama_batch1 --quantization fp8 --quantize-lm-head; done
