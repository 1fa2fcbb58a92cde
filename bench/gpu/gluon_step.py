"""A batch-1 decode step with the Gluon GEMV (``gluon_gemv.py``) in place of the served Triton one (issue #19).

An experiment, not a served path: ``fp8_gemv`` is replaced for the run by a wrapper that sends the online-FP8
decode shapes of ``PLAN`` (per-channel weights, 128-group activations, M <= 16, bf16 out) to ``gluon_gemv`` with
the launch S5 found best for each in the PDL chain (quantizer + GEMV), no K split (so no reduction tail); every
other call goes to the served kernel.  Then ``bench/one_batch.py`` runs with the given arguments.

    PYTHONPATH=. python bench/gpu/gluon_step.py --model-path llama-3.1-8b --load-format dummy \
        --skip-tokenizer-init --input-len 128 --output-len 64 --batch-size 1 --cuda-graph-max-bs 1 --quantization fp8
"""

from __future__ import annotations

import runpy
import sys

import torch

import radixlm.kernels.fp8_gemv as served
from bench.gpu.gluon_gemv import gluon_gemv
from radixlm.kernels.pdl import pdl_enabled

# (N, K) -> gluon_gemv launch; S5, quantizer + GEMV with PDL, us: o 8.78 (served 9.29), qkv 10.72 (11.01),
# down 20.51 (21.80); gate_up keeps the served kernel (35.08 against 35.13).
PLAN = {
    (4096, 4096): dict(block_n=64, stages=6, sub=2, split_k=1, preload=6, ws=True),
    (6144, 4096): dict(block_n=64, stages=4, sub=2, split_k=1, preload=4, ws=False),
    (4096, 14336): dict(block_n=64, stages=4, sub=4, split_k=1, preload=4, ws=True),
}
_served_gemv = served.fp8_gemv
calls = {"gluon": 0, "served": 0}


def fp8_gemv(x_q, x_s, weight, weight_scale, block_size=None, out_dtype=torch.bfloat16, config=None, exact=None,
             pdl=None):
    launch = PLAN.get(tuple(weight.shape))
    if (launch is not None and block_size is None and out_dtype == torch.bfloat16 and x_q.shape[0] <= 16
            and x_s.dim() == 2 and x_s.shape[1] == x_q.shape[1] // 128 and x_q.is_cuda):
        calls["gluon"] += 1
        return gluon_gemv(x_q, x_s, weight, weight_scale, pdl=pdl_enabled(x_q.device), **launch)
    calls["served"] += 1
    return _served_gemv(x_q, x_s, weight, weight_scale, block_size, out_dtype, config, exact, pdl)


served.fp8_gemv = fp8_gemv
sys.argv = ["bench/one_batch.py", *sys.argv[1:]]
try:
    runpy.run_path("bench/one_batch.py", run_name="__main__")
finally:
    print(f"gluon_step: {calls['gluon']} GEMV calls to Gluon, {calls['served']} to the served kernel "
          "(Python calls: graph capture and eager steps; replays run the captured kernels)")
