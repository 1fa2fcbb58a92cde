#!/usr/bin/env bash
# GPU run R2 (one H200, ~3 minutes; issues #19, #20): the fused quantizers' chunk tests on CUDA (R1's one failure,
# test_real_shapes_on_gpu[16384-None-300], was on the one-program-a-row path since removed: does the served code
# at one chunk a row pass?), data-parallel attention's padded CUDA graphs in one process with a made-up peer
# (tests/parity/test_dp_attention.py -k one_process), the CUDA graph tests, and whether triton's Gluon dialect
# (explicit shared memory, TMA, mbarriers, warp specialization: what a decode megakernel would need) is here.
#   bash bench/gpu/session_r2.sh      (GPU machine, repository root; carry .whl)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/unit/test_fused_quant.py \
  tests/parity/test_dp_attention.py tests/unit/test_cuda_graph.py tests/parity/test_fp8_fused.py 2>&1 | quiet \
  > $LOG/tests.txt
grep -E "^FAILED|^E  |Error" $LOG/tests.txt | head -30; tail -1 $LOG/tests.txt
python3 - <<'PY' 2>&1 | grep -v Warning
import importlib
for name in ("triton.experimental.gluon", "triton.experimental.gluon.language.nvidia.hopper",
             "triton.experimental.gluon.language.nvidia.hopper.tma"):
    try:
        m = importlib.import_module(name)
        print("ok", name, sorted(n for n in dir(m) if not n.startswith("_"))[:40])
    except Exception as e:
        print("no", name, type(e).__name__, e)
PY
