"""The batch-1 FP8 GEMV in Gluon (Triton's explicit dialect): prototypes timed against the Triton kernel.

The warp-specialized kernel that grew out of these runs serves now (``radixlm.kernels.gluon_gemv``, GPU runs
S5-S7); this file keeps the single-warp-group prototype with its launch knobs (ring depth, tiles a slot, K split,
slots requested before the PDL wait) and times both against ``fp8_gemv``'s own Triton kernel.

Question (issue #19's last point, the online-FP8 batch-1 step at 1.7x bf16): the served ``fp8_gemv`` needs
about two programs per SM to stream the weight at speed, so the narrow projections (qkv, o, down) split K and pay
a reduction tail (run P3: 0.1 ms of a 2.76 ms step), and deeper Triton pipelines with fewer programs streamed less
(run P6).  Here each program keeps ``STAGES`` weight tiles in flight through TMA copies into a shared-memory ring
with one mbarrier a slot, refilling a slot as soon as the tile's wgmma is done, and requests its first ``PRELOAD``
tiles before its PDL wait (they do not depend on the kernel before).  If that streams the weight at full speed
with one program per 64 weight rows, the narrow projections can drop their K split.

Semantics are the served decode path's: per-channel E4M3 weight ``[N, K]`` with scales ``[N]``, activations
``[M <= 16, K]`` in E4M3 with one scale per token per 128 channels; ``out^T = W x^T`` on the wgmma (weight rows
on its 64-row side, tokens padded to ``BLOCK_M`` by the TMA's zero fill), each 128-wide K tile's dot scaled by
its activation group scale and added to an fp32 accumulator, the weight scale applied at the end; a split-K
launch reduces like the served kernel (partials, the last arriver adds them in split order).

    PYTHONPATH=. python bench/gpu/gluon_gemv.py                 # GPU: check, then the timing table
    PYTHONPATH=. python bench/gpu/gluon_gemv.py --compile-only  # any machine with Triton 3.6: compile for sm_90
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from radixlm.kernels.gluon_gemv import _pdl_trigger, _pdl_wait, gluon_fp8_gemv

SHAPES = {"o": (4096, 4096), "qkv": (6144, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}  # (N, K)


@gluon.jit
def gluon_gemv_kernel(w_desc, x_desc, xs_ptr, ws_ptr, out_ptr, part_ptr, count_ptr,
                      m_dim, n_dim, k_dim, stride_xsm, stride_om,
                      BLOCK_M: gl.constexpr, STAGES: gl.constexpr, SUB: gl.constexpr, SPLIT_K: gl.constexpr,
                      PRELOAD: gl.constexpr, MAX_TILES: gl.constexpr, PDL: gl.constexpr, num_warps: gl.constexpr):
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = w_desc.block_type.shape[1]  # one activation group: a K tile
    pid_n = gl.program_id(0)
    split = gl.program_id(1)
    pid_m = gl.program_id(2)
    off_n = pid_n * BLOCK_N
    off_m = pid_m * BLOCK_M
    k_tiles = gl.cdiv(k_dim, BLOCK_K)
    per_split = gl.cdiv(k_tiles, SPLIT_K)
    t0 = split * per_split
    n_tiles = gl.minimum(per_split, k_tiles - t0)
    n_stages = gl.cdiv(n_tiles, SUB)  # a ring slot holds SUB K tiles

    w_smem = gl.allocate_shared_memory(w_desc.dtype, [STAGES * SUB, BLOCK_N, BLOCK_K], w_desc.layout)
    x_smem = gl.allocate_shared_memory(x_desc.dtype, [STAGES * SUB, BLOCK_M, BLOCK_K], x_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for slot in gl.static_range(STAGES):
        mbarrier.init(bars.index(slot), count=1)
    # A slot's SUB tiles are all copied (past the split's range: zero scales below, or the TMA's zero fill past K),
    # so that its barrier always expects the same bytes.
    slot_bytes: gl.constexpr = SUB * (w_desc.block_type.nbytes + x_desc.block_type.nbytes)

    # The weight does not depend on the kernel before: the first PRELOAD slots' weight tiles are requested before
    # the PDL wait, the activations (written by the kernel before) only after it.  A slot's barrier expects both.
    for slot in gl.static_range(STAGES):
        live = slot < n_stages
        mbarrier.expect(bars.index(slot), slot_bytes, pred=live)
        if slot < PRELOAD:
            for j in gl.static_range(SUB):
                tma.async_copy_global_to_shared(w_desc, [off_n, (t0 + slot * SUB + j) * BLOCK_K], bars.index(slot),
                                                w_smem.index(slot * SUB + j), pred=live)
    _pdl_wait(PDL)
    for slot in gl.static_range(STAGES):
        live = slot < n_stages
        for j in gl.static_range(SUB):
            if slot >= PRELOAD:
                tma.async_copy_global_to_shared(w_desc, [off_n, (t0 + slot * SUB + j) * BLOCK_K], bars.index(slot),
                                                w_smem.index(slot * SUB + j), pred=live)
            tma.async_copy_global_to_shared(x_desc, [off_m, (t0 + slot * SUB + j) * BLOCK_K], bars.index(slot),
                                            x_smem.index(slot * SUB + j), pred=live)

    # The program's activation group scales go to shared memory once: loaded in the loop, each one's global
    # latency stalled every K tile (run S1: 27 GB/s a program however deep the ring).  Zero past the split's range.
    scale_layout: gl.constexpr = gl.BlockedLayout([1, 1], [32 // BLOCK_M, BLOCK_M], [num_warps, 1], [1, 0])
    tiles = gl.arange(0, MAX_TILES, layout=gl.SliceLayout(1, scale_layout))
    tokens = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, scale_layout))
    scale_mask = gl.expand_dims(tiles < n_tiles, 1) & gl.expand_dims(tokens < m_dim, 0)
    scales = gl.load(xs_ptr + gl.expand_dims(tokens, 0) * stride_xsm + t0 + gl.expand_dims(tiles, 1),
                     mask=scale_mask, other=0.0)  # [MAX_TILES, BLOCK_M]
    flat_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
    xs_smem = gl.allocate_shared_memory(gl.float32, [MAX_TILES * BLOCK_M], flat_layout,
                                        gl.reshape(scales, [MAX_TILES * BLOCK_M]))
    xs_smem = xs_smem._reinterpret(gl.float32, [MAX_TILES, BLOCK_M], flat_layout)  # a row per K tile
    gl.thread_barrier()

    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, BLOCK_M, 32])
    rows = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, acc_layout))  # tokens
    cols = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, acc_layout))  # weight rows (outputs)
    row_ok = rows < m_dim
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, acc_layout)
    zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, acc_layout)
    for i in range(n_stages):
        s = i % STAGES
        mbarrier.wait(bars.index(s), (i // STAGES) & 1)
        for j in gl.static_range(SUB):
            part = warpgroup_mma(w_smem.index(s * SUB + j), x_smem.index(s * SUB + j).permute((1, 0)), zero,
                                 use_acc=False, is_async=True)
            part = warpgroup_mma_wait(num_outstanding=0,
                                      deps=(part, w_smem.index(s * SUB + j), x_smem.index(s * SUB + j)))[0]
            x_s = xs_smem.index(i * SUB + j).load(gl.SliceLayout(0, acc_layout))  # [BLOCK_M] the tile's scales
            acc += part * gl.expand_dims(x_s, 0)
        # The slot is free again: request the stage STAGES ahead into it.
        ahead = i + STAGES
        live = ahead < n_stages
        mbarrier.expect(bars.index(s), slot_bytes, pred=live)
        for j in gl.static_range(SUB):
            tma.async_copy_global_to_shared(w_desc, [off_n, (t0 + ahead * SUB + j) * BLOCK_K], bars.index(s),
                                            w_smem.index(s * SUB + j), pred=live)
            tma.async_copy_global_to_shared(x_desc, [off_m, (t0 + ahead * SUB + j) * BLOCK_K], bars.index(s),
                                            x_smem.index(s * SUB + j), pred=live)
    _pdl_trigger(PDL)
    for slot in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(slot))

    col_ok = cols < n_dim
    acc = acc * gl.expand_dims(gl.load(ws_ptr + cols, mask=col_ok, other=0.0), 1)
    mask = gl.expand_dims(col_ok, 1) & gl.expand_dims(row_ok, 0)
    out_ptrs = out_ptr + gl.expand_dims(rows, 0) * stride_om + gl.expand_dims(cols, 1)
    if SPLIT_K == 1:
        gl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tile_part = part_ptr + gl.expand_dims(rows, 0) * n_dim + gl.expand_dims(cols, 1)
        gl.store(tile_part + split * m_dim * n_dim, acc, mask=mask)
        gl.thread_barrier()
        counter = count_ptr + pid_m * gl.num_programs(0) + pid_n
        if gl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1:
            total = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, acc_layout)
            for t in gl.static_range(SPLIT_K):
                total += gl.load(tile_part + t * m_dim * n_dim, mask=mask, other=0.0, cache_modifier=".cg")
            gl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=mask)
            gl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def gluon_gemv(x_q: torch.Tensor, x_s: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               block_n: int = 64, stages: int = 4, sub: int = 1, split_k: int = 1, preload: int = 2,
               num_warps: int = 4, block_m: int = 16, pdl: bool = False) -> torch.Tensor:
    """``(x_q * x_s) @ (weight * weight_scale)^T`` in bf16: ``x_q`` [M, K] E4M3, ``x_s`` [M, K / 128] fp32,
    ``weight`` [N, K] E4M3, ``weight_scale`` [N] fp32.  The ring has ``stages`` slots of ``sub`` K tiles (128
    wide) each; ``preload`` slots' weight tiles are requested before the PDL wait."""
    m, k = x_q.shape
    n = weight.shape[0]
    block_k = 128
    if x_s.shape != (m, k // block_k) or k % block_k:
        raise ValueError(f"gluon_gemv: 128-group activation scales expected, got {tuple(x_s.shape)} for K={k}")
    w_layout = gl.NVMMASharedLayout.get_default_for([block_n, block_k], gl.float8e4nv)
    x_layout = gl.NVMMASharedLayout.get_default_for([block_m, block_k], gl.float8e4nv)
    w_desc = TensorDescriptor(weight, list(weight.shape), list(weight.stride()), [block_n, block_k], w_layout)
    x_desc = TensorDescriptor(x_q, list(x_q.shape), list(x_q.stride()), [block_m, block_k], x_layout)
    out = torch.empty((m, n), dtype=torch.bfloat16, device=x_q.device)
    if split_k > 1:
        part = torch.empty((split_k, m, n), dtype=torch.float32, device=x_q.device)
        if x_q.device not in _COUNTERS:
            _COUNTERS[x_q.device] = torch.zeros(1 << 16, dtype=torch.int32, device=x_q.device)
        counters = _COUNTERS[x_q.device]
    else:
        part = counters = out
    per_split = triton.cdiv(k // block_k, split_k)
    grid = (triton.cdiv(n, block_n), split_k, triton.cdiv(m, block_m))
    extra = {"launch_pdl": True} if pdl else {}
    gluon_gemv_kernel[grid](w_desc, x_desc, x_s, weight_scale, out, part, counters, m, n, k, x_s.stride(0), out.stride(0),
                 BLOCK_M=block_m, STAGES=stages, SUB=sub, SPLIT_K=split_k, PRELOAD=min(preload, stages),
                 MAX_TILES=triton.next_power_of_2(triton.cdiv(per_split, sub) * sub), PDL=pdl, num_warps=num_warps,
                 **extra)
    return out


CONFIGS = [  # (block_n, stages, sub, split_k, preload): S4's best single-warp-group launches
    (64, 3, 4, 1, 3), (64, 4, 2, 1, 4), (64, 4, 1, 4, 2), (128, 3, 2, 1, 3),
]


def compile_only() -> None:
    """Compile every config for sm_90 without a GPU (signatures from CPU tensors), so that a kernel edit can be
    checked before a GPU call."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    target = GPUTarget("cuda", 90, 32)
    w = torch.empty(256, 1024, dtype=torch.float8_e4m3fn)
    x = torch.empty(1, 1024, dtype=torch.float8_e4m3fn)
    for (bn, st, sub, sk, pre), bm in itertools.product(CONFIGS, (16, 8)):
        w_desc = TensorDescriptor(w, [256, 1024], [1024, 1], [bn, 128],
                                  gl.NVMMASharedLayout.get_default_for([bn, 128], gl.float8e4nv))
        x_desc = TensorDescriptor(x, [1, 1024], [1024, 1], [bm, 128],
                                  gl.NVMMASharedLayout.get_default_for([bm, 128], gl.float8e4nv))
        sig = {"w_desc": mangle_type(w_desc, True), "x_desc": mangle_type(x_desc, True),
               "xs_ptr": "*fp32", "ws_ptr": "*fp32", "out_ptr": "*bf16", "part_ptr": "*fp32", "count_ptr": "*i32",
               "m_dim": "i32", "n_dim": "i32", "k_dim": "i32", "stride_xsm": "i32", "stride_om": "i32"}
        constexprs = {"BLOCK_M": bm, "STAGES": st, "SUB": sub, "SPLIT_K": sk, "PRELOAD": pre,
                      "MAX_TILES": triton.next_power_of_2(triton.cdiv(8 // sk, sub) * sub), "PDL": True,
                      "num_warps": 4}
        sig.update({name: "constexpr" for name in constexprs})
        kernel = triton.compile(GluonASTSource(gluon_gemv_kernel, sig, constexprs), target=target,
                                options={"num_warps": 4})
        print(f"compiled bn={bn} stages={st} sub={sub} split={sk} preload={pre} bm={bm}: "
              f"{kernel.metadata.shared} B shared", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile-only", action="store_true")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    args = parser.parse_args()
    if args.compile_only:
        compile_only()
        return
    from bench.gpu.fp8_gemm import rotating_graph_us
    from radixlm.kernels.fp8_gemm import per_token_group_quant_fp8_triton as quantize
    from radixlm.kernels.fp8_gemv import default_gemv_config, fp8_gemv

    def layer(gemv, x: torch.Tensor, w: tuple[torch.Tensor, torch.Tensor], **kw) -> torch.Tensor:
        """The decode layer as served: the 128-group quantizer, then the GEMV, both launched with PDL."""
        x_q, x_s = quantize(x, 128, pdl=True)
        return gemv(x_q, x_s, *w, pdl=True, **kw)

    gen = torch.Generator(device="cuda").manual_seed(11)
    print("us per call in CUDA graphs over rotating weight copies (256 MB); TB/s of the weight bytes")
    for name in args.shapes:
        n, k = SHAPES[name]
        weights = []
        for _ in range(max(2, -(-(256 << 20) // (n * k)))):
            w = (torch.randn(n, k, generator=gen, device="cuda", dtype=torch.bfloat16) * 100).clamp_(-448, 448)
            w_s = (0.5 + torch.rand(n, generator=gen, device="cuda")) / (100 * k**0.5)
            weights.append((w.to(torch.float8_e4m3fn), w_s))
        x = torch.randn(1, k, generator=gen, device="cuda", dtype=torch.bfloat16)
        x_q, x_s = quantize(x, 128)
        # The Triton kernel at its default launch (an explicit config keeps fp8_gemv off the Gluon kernel).
        config = default_gemv_config(n, k, torch.cuda.get_device_properties(0).multi_processor_count)
        served = fp8_gemv(x_q, x_s, *weights[0], config=config).float()
        ref = (x_q.float() * x_s.repeat_interleave(128, 1)) @ (weights[0][0].float() * weights[0][1][:, None]).t()
        print(f"{name} N={n} K={k}: served rel err against fp32 {((served - ref).norm() / ref.norm()).item():.2e}",
              flush=True)
        t = rotating_graph_us([lambda w=w: fp8_gemv(x_q, x_s, *w, config=config) for w in weights])
        t_layer = rotating_graph_us([lambda w=w: layer(fp8_gemv, x, w, config=config) for w in weights])
        print(f"  Triton GEMV (fp8_gemv's own kernel)     {t:6.2f} us ({n * k / t / 1e6:.2f} TB/s), quantizer + "
              f"GEMV with PDL {t_layer:6.2f} us", flush=True)
        if (n, k) != (28672, 4096):  # the served Gluon kernel (warp-specialized, no split) on the narrow weights
            out = gluon_fp8_gemv(x_q, x_s, *weights[0], torch.bfloat16, False).float()
            err = ((out - served).norm() / served.norm()).item()
            t = rotating_graph_us([lambda w=w: gluon_fp8_gemv(x_q, x_s, *w, torch.bfloat16, False) for w in weights])
            t_layer = rotating_graph_us([lambda w=w: layer(lambda *a, pdl: gluon_fp8_gemv(*a, torch.bfloat16, pdl),
                                                           x, w) for w in weights])
            print(f"  radixlm.kernels.gluon_gemv (served)      {t:6.2f} us ({n * k / t / 1e6:.2f} TB/s), quantizer + "
                  f"GEMV with PDL {t_layer:6.2f} us; against Triton {err:.1e}", flush=True)
        for bn, st, sub, sk, pre in CONFIGS:
            kw = dict(block_n=bn, stages=st, sub=sub, split_k=sk, preload=pre)
            try:
                out = gluon_gemv(x_q, x_s, *weights[0], **kw).float()
                err = ((out - served).norm() / served.norm()).item()
                t = rotating_graph_us([lambda w=w: gluon_gemv(x_q, x_s, *w, **kw) for w in weights])
                t_layer = rotating_graph_us([lambda w=w: layer(gluon_gemv, x, w, **kw) for w in weights])
                print(f"  gluon bn={bn:3d} st={st:2d} sub={sub} split={sk} pre={pre:2d}     {t:6.2f} us "
                      f"({n * k / t / 1e6:.2f} TB/s), quantizer + GEMV with PDL {t_layer:6.2f} us; against served "
                      f"{err:.1e}", flush=True)
            except Exception as exc:  # noqa: BLE001 (a config the hardware refuses: report, go on)
                print(f"  gluon {kw}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}", flush=True)
        del weights
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
