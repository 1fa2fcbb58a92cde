#!/usr/bin/env bash
# GPU run R1 (one H200, ~2 minutes; issue #19), prepared in the stop of 2026-12-03 (e), not yet run: why the
# quantizing norms cost ~0.9 us more than the plain ones in a batch-1 FP8 step (run Q4: 2.27 / 2.66 against 1.38 /
# 1.70 us a layer).  The fused norm and SiLU-mul quantizers at 1024 columns a program (served: a 4096-wide row over
# four programs, each reading the whole row for the statistic) and at one program a row (4096, 16384), beside the
# producers without quantization.  The results are bit-identical at every chunk (checked on CPU under the
# interpreter); if one program a row wins, change fused_quant._CHUNK and measure a step with llama_batch1.
#   bash bench/gpu/session_r1.sh      (GPU machine, repository root; carry .whl, .carry)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 120 python3 bench/gpu/fused_quant.py --chunks 1024 4096 16384 --quants g128 2>&1 | grep -v Warning
llama_batch1 --quantization fp8
