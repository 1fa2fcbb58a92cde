#!/usr/bin/env bash
# GPU run D, part 4 (any one-GPU machine): structured-output cost at batch 32 on the 1B and 8B presets, the 1B
# run with a host profile of 20 constrained decode steps and both with the host cost of filling the masks.
#   bash bench/gpu/structured_profile.sh     (GPU machine, repository root; wheels in .whl, tokenizer in .carry)
source bench/gpu/setup.sh >/dev/null || exit 1
for model in llama-3.2-1b llama-3.1-8b; do
  extra=""; [ $model = llama-3.2-1b ] && extra="--profile 20"
  timeout 120 python3 bench/structured.py --model-path $model --load-format dummy --tokenizer-path $TOK \
    --batch-size 32 --output-len 128 $extra 2>&1 | grep -v "Warning\|warn(" | tee $LOG/structured_$model.txt \
    | tail -9
done
