"""Compile the decode path's Triton kernels (and the prefill's attention and FP8 GEMM) for sm_90 (the H200) on a
machine without a GPU.

The Triton interpreter, which runs the kernels in CI, accepts programs the compiler refuses (a constexpr branch
returning another type than the code after it, say), so a kernel can pass every CPU test and fail on its first
GPU launch.  This script runs the launchers with CPU tensors of small real shapes, catches each launch's
arguments instead of launching (``JITFunction.__getitem__``), and compiles that specialization to PTX and a cubin
for sm_90 with Triton's own ptxas, PDL on, as the GPU would.  Exit status 1 on any failure, each one printed.

    python tests/tools/sm90_compile.py      (without TRITON_INTERPRET; tests/unit/test_sm90_compile.py runs it)
"""

from __future__ import annotations

import os
import sys
import traceback

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("sm90_compile.py compiles kernels: run it without TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction, mangle_type  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")
LAUNCH_ONLY = {"launch_pdl", "num_ctas", "maxnreg", *OPTIONS}


def capture(launch) -> list[tuple[JITFunction, dict, dict]]:
    """The (kernel, bound arguments, compile options) of every launch ``launch()`` makes."""
    launches = []

    def getitem(self, grid):
        def record(*args, **kwargs):
            bound = dict(zip(self.arg_names, args))
            bound.update({k: v for k, v in kwargs.items() if k not in LAUNCH_ONLY})
            launches.append((self, bound, {k: v for k, v in kwargs.items() if k in OPTIONS}))
        return record

    original = JITFunction.__getitem__
    JITFunction.__getitem__ = getitem
    try:
        launch()
    finally:
        JITFunction.__getitem__ = original
    return launches


def compile_sm90(fn: JITFunction, bound: dict, options: dict) -> None:
    gluon = fn.is_gluon()  # a Gluon kernel's TMA descriptors carry their shared layout in the signature
    signature, constexprs = {}, {}
    for param in fn.params:
        if param.name == "num_warps":  # a Gluon kernel's parameter: the launch option
            value = options.get("num_warps", 4)
        else:
            value = True if param.name == "PDL" else bound[param.name]  # launched with PDL on sm_90
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
        else:
            signature[param.name] = mangle_type(value, gluon and not isinstance(value, (int, float)))
    if gluon:
        from triton.experimental.gluon._runtime import GluonASTSource
        source = GluonASTSource(fn, signature, constexprs)
    else:
        source = ASTSource(fn, signature, constexprs)
    triton.compile(source, target=TARGET, options=options)


def cases():
    """(name, launch) pairs: each launch calls a launcher as the engine does."""
    from radixlm.kernels import fused_ops, fused_quant, gluon_gemv
    from radixlm.kernels.argmax import triton_argmax
    from radixlm.kernels.decode_attention import decode_attention_fwd
    from radixlm.kernels.extend_attention import extend_attention_fwd
    from radixlm.kernels.fp8 import FP8_DTYPE
    from radixlm.kernels.fp8_activation import ActivationQuant
    from radixlm.kernels.fp8_gemm import (
        per_token_group_quant_fp8_triton, per_token_quant_fp8_triton, w8a8_block_fp8_matmul_triton,
    )
    from radixlm.kernels.fp8_gemv import GemvConfig, fp8_gemv
    from radixlm.kernels.kv_store import KVStore, store_kv

    bf16, e4m3, e5m2 = torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2
    m, heads, kv_heads, hd, k = 3, 4, 2, 128, 512
    loc, pos = torch.tensor([0, 5, 7]), torch.tensor([1, 2, 3])
    table = torch.randn(16, hd)

    def kv(dtype):
        bufs = [torch.zeros(8, kv_heads, hd, dtype=dtype) for _ in range(2)]
        quant = dtype in (e4m3, e5m2)
        return KVStore(*bufs, loc, torch.ones(1) if quant else None, torch.ones(1) if quant else None)

    q, kk, v = (torch.randn(m, h, hd, dtype=bf16) for h in (heads, kv_heads, kv_heads))
    for dtype in (None, bf16, e4m3, e5m2):
        yield f"rotary, K/V store {dtype}", lambda dtype=dtype: fused_ops.apply_rotary(
            q, kk, pos, table, hd, v if dtype else None, kv(dtype) if dtype else None)
    yield "rotary, partial rotary_dim, K/V store e4m3", lambda: fused_ops.apply_rotary(
        q, kk, pos, table[:, :64].contiguous(), 64, v, kv(e4m3))
    for dtype in (bf16, e4m3):
        yield f"store_kv {dtype}", lambda dtype=dtype: store_kv(kv(dtype).k_buf, loc, kk, kv(dtype).v_buf, v,
                                                                 *kv(dtype)[3:])
    x_q = torch.zeros(m, k, dtype=FP8_DTYPE)
    per_group, per_token = torch.ones(m, k // 128), torch.ones(m, 1)
    w_chan = lambda n: (torch.zeros(n, k, dtype=FP8_DTYPE), torch.ones(n))  # noqa: E731
    w_block = lambda n: (torch.zeros(n, k, dtype=FP8_DTYPE), torch.ones(n // 128, k // 128))  # noqa: E731
    for split, preload in ((1, 0), (4, 0), (2, 1), (2, 2)):
        config = GemvConfig(64, 128, 4, 4, split, preload)
        yield f"gemv split {split} preload {preload}", lambda c=config: fp8_gemv(x_q, per_group, *w_chan(256),
                                                                                  None, bf16, c)
    yield "gemv per token", lambda: fp8_gemv(x_q, per_token, *w_chan(256), None, bf16)
    yield "gemv block", lambda: fp8_gemv(x_q, per_group, *w_block(256), (128, 128), bf16)
    yield "gemv exact", lambda: fp8_gemv(x_q, per_group, *w_chan(256), None, torch.float32)
    if gluon_gemv.gluon is not None:  # Triton 3.6 only (the module docstring says why)
        for kk in (4096, 14336):
            x_g, s_g = torch.zeros(m, kk, dtype=FP8_DTYPE), torch.ones(m, kk // 128)
            yield f"gluon gemv K {kk}", lambda x_g=x_g, s_g=s_g, kk=kk: gluon_gemv.gluon_fp8_gemv(
                x_g, s_g, torch.zeros(4096, kk, dtype=FP8_DTYPE), torch.ones(4096), bf16, True)
        yield "gluon gemv wide", lambda: gluon_gemv.gluon_fp8_gemv(
            torch.zeros(m, 4096, dtype=FP8_DTYPE), torch.ones(m, 32), torch.zeros(1024, 4096, dtype=FP8_DTYPE),
            torch.ones(1024), bf16, True, gluon_gemv.WIDE_LAUNCH)
    for dtype in (torch.float32, bf16):
        yield f"argmax {dtype}", lambda dtype=dtype: triton_argmax(torch.zeros(m, 5000, dtype=dtype))
    x = torch.randn(m, 2 * k, dtype=bf16)
    wide = torch.randn(m, 8 * k, dtype=bf16)  # past fused_quant._CHUNK: a row over several programs
    for rows, group in ((x, 128), (x, None), (wide, 128), (wide, None)):
        yield (f"rms_norm quant {rows.shape[1]} group {group}",
               lambda rows=rows, group=group: fused_quant.rms_norm_quant_fp8(
                   rows, rows, torch.ones(rows.shape[1], dtype=bf16), 1e-6, ActivationQuant(group)))
    yield "silu_and_mul quant", lambda: fused_quant.silu_and_mul_quant_fp8(x, ActivationQuant(128))

    def decode(cache, dk, dv, kv_heads, o_dtype=bf16, group=None):
        bs, splits = 2, 8
        q = torch.randn(bs, 16, dk, dtype=bf16)
        k_buf = torch.zeros(32, kv_heads, dk, dtype=cache)
        v_buf = k_buf[..., :dv] if dv != dk else torch.zeros(32, kv_heads, dv, dtype=cache)
        scales = (torch.ones(1), torch.ones(1)) if cache in (e4m3, e5m2) else (None, None)
        o = torch.empty(bs, 16, dv, dtype=o_dtype)
        o_scale = torch.empty(bs, 16 * dv // group) if group else None
        decode_attention_fwd(q, k_buf, v_buf, o, torch.zeros(4, 64, dtype=torch.int32), torch.arange(bs),
                             torch.tensor([5, 40]), torch.empty(bs, 16, splits, dv), torch.empty(bs, 16, splits),
                             dv**-0.5, None, None, *scales, o_scale=o_scale)

    yield "rms_norm, add + rms_norm, silu_and_mul", lambda: (
        fused_ops.rms_norm(x, torch.ones(2 * k, dtype=bf16), 1e-6),
        fused_ops.fused_add_rms_norm(x, x, torch.ones(2 * k, dtype=bf16), 1e-6), fused_ops.silu_and_mul(x))
    yield "activation quantizers, block GEMM", lambda: (
        per_token_group_quant_fp8_triton(x, 128), per_token_quant_fp8_triton(x),
        w8a8_block_fp8_matmul_triton(torch.zeros(64, k, dtype=FP8_DTYPE), torch.ones(64, k // 128),
                                     *w_block(256), (128, 128), bf16))

    def extend(cache):
        scales = (torch.ones(1), torch.ones(1)) if cache in (e4m3, e5m2) else (None, None)
        k_buf, v_buf = (torch.zeros(64, kv_heads, hd, dtype=cache) for _ in range(2))
        extend_attention_fwd(torch.randn(6, heads, hd, dtype=bf16), k_buf, v_buf,
                             torch.empty(6, heads, hd, dtype=bf16), torch.zeros(2, 64, dtype=torch.int32),
                             torch.arange(2), torch.tensor([3, 0]), torch.tensor([4, 2]), torch.tensor([0, 4]), 4,
                             hd**-0.5, None, None, None, *scales)

    yield "extend bf16", lambda: extend(bf16)
    yield "extend fp8 KV", lambda: extend(e4m3)
    yield "decode GQA bf16", lambda: decode(bf16, 128, 128, 4)
    yield "decode GQA fp8 KV, E4M3 output", lambda: decode(e4m3, 128, 128, 4, FP8_DTYPE, 128)
    yield "decode MLA-wide", lambda: decode(bf16, 576, 512, 1)


def main() -> int:
    failures = 0
    for name, launch in cases():
        try:
            launches = capture(launch)
            assert launches, "no launch"
            for fn, bound, options in launches:
                compile_sm90(fn, bound, options)
            print(f"ok    {name}: {', '.join(fn.__name__ for fn, _, _ in launches)}")
        except Exception:  # every case is tried; each failure printed whole
            failures += 1
            print(f"FAIL  {name}\n{traceback.format_exc()}")
    print(f"{failures} of the cases failed to compile for sm_90" if failures else "all compiled for sm_90")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
