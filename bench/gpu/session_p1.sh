#!/usr/bin/env bash
# GPU run P1 (one H200, ~7 minutes; issue #19): pulling the next weights into L2 while HBM idles.
# RADIXLM_L2_PREFETCH (radixlm/layers/prefetch.py) names, per decoder layer, where a decode step prefetches which
# weight bytes (radixlm/kernels/l2_prefetch.py); Llama-3.1-8B batch-1 decode under several plans, FP8 and bf16.
#   bash bench/gpu/session_p1.sh      (GPU machine, repository root, at cacc332: the experiment was reverted after
#   it lost at every plan; carry .whl, .carry)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
ALL="post_qkv:o:64,post_attn:gate_up:16,post_gate_up:down:8,pre_norm:qkv:8"
RADIXLM_L2_PREFETCH=$ALL timeout 150 python3 -m pytest -q -p no:cacheprovider tests/unit/test_l2_prefetch.py \
  tests/parity/test_fp8_fused.py tests/unit/test_cuda_graph.py 2>&1 | quiet > $LOG/tests.txt
grep -E "^FAILED|^E  " $LOG/tests.txt | head -12; tail -1 $LOG/tests.txt
ARGS="--model-path llama-3.1-8b --load-format dummy --skip-tokenizer-init --input-len 128 --output-len 64 \
  --batch-size 1 --cuda-graph-max-bs 1"
one_batch() { local plan=$1; shift; echo "-- $(date +%T) plan '$plan' $*"
  RADIXLM_L2_PREFETCH=$plan timeout 60 python3 bench/one_batch.py $ARGS "$@" 2>&1 | quiet | grep -E "^ +[0-9]+ "; }
P1="post_qkv:o:64"
P2="post_qkv:o:64,post_attn:gate_up:16"
P3="post_qkv:o:64,post_attn:gate_up:16,post_gate_up:down:8"
P5="post_qkv:o:64,post_qkv:gate_up:16,post_gate_up:down:8,pre_norm:qkv:8"
P6="post_qkv:o:64,post_qkv:gate_up:24,post_attn:gate_up:16,post_gate_up:down:12,pre_norm:qkv:12"
for plan in "" "$P1" "$P2" "$P3" "$ALL" "$P5" "$P6" ""; do one_batch "$plan" --quantization fp8; done
for plan in "" "$P1" "$P3" "$ALL"; do one_batch "$plan"; done
PROF="python3 bench/decode_profile.py --model-path llama-3.1-8b --load-format dummy --skip-tokenizer-init \
  --cases 1x256 --replay-kernels --quantization fp8"
RADIXLM_L2_PREFETCH=$ALL timeout 90 $PROF > $LOG/profile_all.txt 2>&1; tail -3 $LOG/profile_all.txt
