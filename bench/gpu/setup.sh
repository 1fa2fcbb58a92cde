# Source on the lent GPU machine (no network): install the carried wheels and put the repository on the path.
# .whl (git-ignored; fetch here with `pip download --no-deps --only-binary=:all: --python-version 3.12
# --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl NAME==VER`):
# pyzmq 27.3.0, fastapi 0.165.0, starlette 1.10.0, uvicorn 0.54.0, sniffio 1.3.1, pydantic 2.14.4,
# pydantic_core 2.50.5, typing_inspection 0.4.5, typing_extensions 4.16.0, annotated_types 0.8.0,
# opentelemetry_api 1.45.2, xgrammar 0.2.9, apache_tvm_ffi 0.1.15.post2, and for the LoRA tests peft 0.21.2, accelerate
# 1.16.0, psutil, pyyaml (the H200 image has h11, anyio, idna,
# click, annotated_doc, pytest, hypothesis, prometheus-client).  Call `run` with carry [".whl", ".carry"].
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || return 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PATH=/tmp/site/bin:$PATH
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__, torch.cuda.get_device_name())"
# What the session scripts share: where logs go, the carried tokenizer (real prompts and grammars on dummy
# weights; copy the embedded model's tokenizer.json, tokenizer_config.json and chat_template.jinja there), and a
# filter for progress bars and per-rank log lines.
LOG=${OUT:-/tmp}
TOK=$PWD/.carry/smollm2-tokenizer
quiet() { grep -v "it/s\]\|^\[scheduler\|Warning\|warn(\|TCPStore" ; }
# CUDA tests, their log in $LOG/tests.txt; prints the failures and the summary line: cuda_tests SECONDS FILES...
cuda_tests() { local t=$1; shift; timeout "$t" python3 -m pytest -q -p no:cacheprovider "$@" 2>&1 | quiet \
  > $LOG/tests.txt; grep -E "^FAILED|^ERROR" $LOG/tests.txt | head -12; tail -1 $LOG/tests.txt; }
# Run the shell functions lane0 and lane1 at once, each on its own GPU, then print their logs.
run_lanes() {
  (export CUDA_VISIBLE_DEVICES=0; lane0 > $LOG/lane0.txt 2>&1) &
  (export CUDA_VISIBLE_DEVICES=1; lane1 > $LOG/lane1.txt 2>&1) &
  wait
  echo "== lane 0"; cat $LOG/lane0.txt
  echo "== lane 1"; cat $LOG/lane1.txt
}
# Llama-3.1-8B (dummy weights) LoRA decode through bench/lora_bench.py, its table without blank or log lines:
# lora_e2e SECONDS ARGS... (from the repository root; runs in bench/, where lora_bench.py writes its adapters)
lora_e2e() { local t=$1; shift; (cd bench && timeout "$t" python3 lora_bench.py --model-path llama-3.1-8b \
  --load-format dummy --input-len 256 --output-len 32 --repeat 2 --cuda-graph-max-bs 128 "$@" 2>&1 | quiet \
  | grep -v "^\s*$" | grep -v "INFO\|it/s"); }
# Llama-3.1-8B (dummy weights) batch-1 decode through bench/one_batch.py, its result row after a dated header:
# llama_batch1 [--quantization fp8 ...] (the command of the GPU runs O-P in docs/benchmarks.md)
LLAMA_BATCH1="--model-path llama-3.1-8b --load-format dummy --skip-tokenizer-init --input-len 128 --output-len 64 \
  --batch-size 1 --cuda-graph-max-bs 1"
llama_batch1() { echo "-- $(date +%T) $*"; timeout 60 python3 bench/one_batch.py $LLAMA_BATCH1 "$@" 2>&1 | quiet \
  | grep -E "^ +[0-9]+ "; }
