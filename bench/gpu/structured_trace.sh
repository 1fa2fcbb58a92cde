#!/usr/bin/env bash
# GPU run D, part 5 (any one-GPU machine): a Chrome trace of 8 constrained decode steps at batch 32 on the 8B
# preset (host ops and GPU kernels), to find what keeps the overlap schedule from hiding the grammar work.
#   bash bench/gpu/structured_trace.sh     (GPU machine, repository root; wheels in .whl, tokenizer in .carry)
source bench/gpu/setup.sh >/dev/null || exit 1
timeout 150 python3 bench/structured.py --model-path llama-3.1-8b --load-format dummy \
  --tokenizer-path $TOK --batch-size 32 --output-len 128 --profile 8 \
  --trace /tmp/trace_8b.json 2>&1 | grep -v "Warning\|warn(" | tail -9
gzip -c /tmp/trace_8b.json > $LOG/trace_8b.json.gz; ls -la $LOG
