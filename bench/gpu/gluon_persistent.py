"""What a kernel boundary costs in the batch-1 FP8 decode layer, and what a persistent kernel would save (issue #19).

The online-FP8 Llama-3.1-8B layer is ten kernels; run Q4 put ~27 us of its 79 outside the weight stream.  The
structural answer is a persistent decode kernel: one program per SM streaming one weight after another through
a ring of shared-memory slots, a grid-wide barrier where the next projection needs the whole previous output,
and the next projection's weight tiles already in flight while the programs wait at the barrier.

This prototype measures that mechanism on the MLP's two projections before anything is built around it:
phase 1 is gate_up's GEMV (28672 x 4096), phase 2 down's (4096 x 14336, K split over ``split`` programs, the last
arriver of a column tile adding the partials in order), each program walking its units of both phases as one
stream of K tiles through one TMA ring.  The activations of phase 2 are a given quantized vector, not phase 1's
SiLU-mul (that epilogue is the next step); ``barrier`` makes phase 2's activation loads wait for every program to
finish phase 1, as the real dependency would, while its weight tiles are requested ahead of it.

Rows: the served Triton GEMVs back to back (PDL), the two Gluon GEMVs of ``gluon_gemv.py`` back to back (PDL),
and the persistent kernel with and without the barrier (without: the floor of any fusion), with one program
per SM and with two or three (all resident at once: the barrier needs every program running).

    PYTHONPATH=. python bench/gpu/gluon_persistent.py                 # GPU
    PYTHONPATH=. python bench/gpu/gluon_persistent.py --compile-only  # any machine with Triton 3.6
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

from bench.gpu.gluon_gemv import gluon_gemv
from radixlm.kernels.gluon_gemv import _pdl_trigger, _pdl_wait

TILE_N, TILE_K = 64, 128  # weight rows a unit (the wgmma M side); a K tile, one activation group
BLOCK_N, BLOCK_K = gl.constexpr(TILE_N), gl.constexpr(TILE_K)  # the same, for the kernels


@gluon.jit
def _issue(L, slot, L1, T1, T2, pid, P, bar, w_smem, x_smem, w1_desc, x1_desc, w2_desc, x2_desc,
           WITH_X2: gl.constexpr, SPLIT2: gl.constexpr, SLOT_BYTES: gl.constexpr):
    """Request the program's K tile number ``L`` of its stream into ``slot``: the weight tile, and the activation
    tile unless it is a phase-2 tile requested before the barrier (``WITH_X2`` False: its barrier still expects
    both; the activation copy follows after the barrier)."""
    mbarrier.expect(bar, SLOT_BYTES)
    if L < L1:
        unit = pid + (L // T1) * P
        k = (L % T1) * BLOCK_K
        tma.async_copy_global_to_shared(w1_desc, [unit * BLOCK_N, k], bar, w_smem.index(slot))
        tma.async_copy_global_to_shared(x1_desc, [0, k], bar, x_smem.index(slot))
    else:
        unit = pid + ((L - L1) // T2) * P
        k = ((unit % SPLIT2) * T2 + (L - L1) % T2) * BLOCK_K
        tma.async_copy_global_to_shared(w2_desc, [(unit // SPLIT2) * BLOCK_N, k], bar, w_smem.index(slot))
        if WITH_X2:
            tma.async_copy_global_to_shared(x2_desc, [0, k], bar, x_smem.index(slot))


@gluon.jit
def _x2_copy(L, slot, L1, T2, pid, P, bar, x_smem, x2_desc, SPLIT2: gl.constexpr):
    """The deferred activation copy of phase-2 tile ``L`` (see ``_issue``)."""
    unit = pid + ((L - L1) // T2) * P
    k = ((unit % SPLIT2) * T2 + (L - L1) % T2) * BLOCK_K
    tma.async_copy_global_to_shared(x2_desc, [0, k], bar, x_smem.index(slot))


@gluon.jit
def _scales(xs_ptr, n_tiles, MAX_TILES: gl.constexpr, BLOCK_M: gl.constexpr, num_warps: gl.constexpr):
    """One token's ``n_tiles`` group scales as a flat [MAX_TILES * BLOCK_M] row-major tile (scale t at row t,
    column 0; zeros elsewhere), for a shared buffer read a row per K tile (``_reinterpret``; a global load per K
    tile capped a program at 27 GB/s, run S1)."""
    layout: gl.constexpr = gl.BlockedLayout([1, 1], [32 // BLOCK_M, BLOCK_M], [num_warps, 1], [1, 0])
    tiles = gl.arange(0, MAX_TILES, layout=gl.SliceLayout(1, layout))
    tokens = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, layout))
    mask = gl.expand_dims(tiles < n_tiles, 1) & gl.expand_dims(tokens < 1, 0)
    scales = gl.load(xs_ptr + gl.expand_dims(tiles, 1) + gl.expand_dims(tokens, 0) * 0, mask=mask, other=0.0)
    return gl.reshape(scales, [MAX_TILES * BLOCK_M])


@gluon.jit
def two_phase_kernel(w1_desc, x1_desc, xs1_ptr, ws1_ptr, out1_ptr, n1,
                     w2_desc, x2_desc, xs2_ptr, ws2_ptr, out2_ptr, part2_ptr, count2_ptr, n2, sync_ptr,
                     T1: gl.constexpr, T2: gl.constexpr, SPLIT2: gl.constexpr, STAGES: gl.constexpr,
                     MAX1: gl.constexpr, MAX2: gl.constexpr, BARRIER: gl.constexpr, PDL: gl.constexpr,
                     num_warps: gl.constexpr):
    BLOCK_M: gl.constexpr = x1_desc.block_type.shape[0]
    pid = gl.program_id(0)
    P = gl.num_programs(0)
    units1 = gl.cdiv(n1, BLOCK_N)
    units2 = gl.cdiv(n2, BLOCK_N) * SPLIT2
    L1 = gl.maximum(gl.cdiv(units1 - pid, P), 0) * T1  # this program's phase-1 K tiles, then phase 2's
    L_total = L1 + gl.maximum(gl.cdiv(units2 - pid, P), 0) * T2
    slot_bytes: gl.constexpr = w1_desc.block_type.nbytes + x1_desc.block_type.nbytes

    w_smem = gl.allocate_shared_memory(w1_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], w1_desc.layout)
    x_smem = gl.allocate_shared_memory(x1_desc.dtype, [STAGES, BLOCK_M, BLOCK_K], x1_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for slot in gl.static_range(STAGES):
        mbarrier.init(bars.index(slot), count=1)

    flat: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
    xs1_smem = gl.allocate_shared_memory(gl.float32, [MAX1 * BLOCK_M], flat)
    xs2_smem = gl.allocate_shared_memory(gl.float32, [MAX2 * BLOCK_M], flat)

    _pdl_wait(PDL)
    xs1_smem.store(_scales(xs1_ptr, T1, MAX1, BLOCK_M, num_warps))
    if not BARRIER:
        xs2_smem.store(_scales(xs2_ptr, T2 * SPLIT2, MAX2, BLOCK_M, num_warps))
    gl.thread_barrier()
    xs1 = xs1_smem._reinterpret(gl.float32, [MAX1, BLOCK_M], flat)  # a row per K tile
    xs2 = xs2_smem._reinterpret(gl.float32, [MAX2, BLOCK_M], flat)
    for slot in gl.static_range(STAGES):
        if slot < L_total:
            _issue(slot, slot, L1, T1, T2, pid, P, bars.index(slot), w_smem, x_smem, w1_desc, x1_desc, w2_desc,
                   x2_desc, not BARRIER, SPLIT2, slot_bytes)

    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, BLOCK_M, 32])
    cols0 = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, acc_layout))
    rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, acc_layout))
    row_ok = rows < 1  # one token: the prototype's decode row
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, acc_layout)
    zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, acc_layout)
    for L in range(L_total):
        if BARRIER:
            if L == L1:
                # Phase 1's outputs are stored: arrive, wait for every program, then request the activation
                # tiles of the phase-2 tiles already in flight (their weights were requested before).
                gl.thread_barrier()
                gl.atomic_add(sync_ptr, 1, sem="release", scope="gpu")
                arrived = gl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")
                while arrived < P:
                    arrived = gl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")
                xs2_smem.store(_scales(xs2_ptr, T2 * SPLIT2, MAX2, BLOCK_M, num_warps))
                gl.thread_barrier()
                for ahead in gl.static_range(STAGES):
                    if L + ahead < L_total:
                        _x2_copy(L + ahead, (L + ahead) % STAGES, L1, T2, pid, P, bars.index((L + ahead) % STAGES),
                                 x_smem, x2_desc, SPLIT2)
        s = L % STAGES
        mbarrier.wait(bars.index(s), (L // STAGES) & 1)
        part = warpgroup_mma(w_smem.index(s), x_smem.index(s).permute((1, 0)), zero, use_acc=False, is_async=True)
        part = warpgroup_mma_wait(num_outstanding=0, deps=(part, w_smem.index(s), x_smem.index(s)))[0]
        if L + STAGES < L_total:
            _issue(L + STAGES, s, L1, T1, T2, pid, P, bars.index(s), w_smem, x_smem, w1_desc, x1_desc, w2_desc,
                   x2_desc, (not BARRIER) or (L + STAGES >= L1 + STAGES), SPLIT2, slot_bytes)
        if L < L1:
            t = L % T1
            x_s = xs1.index(t).load(gl.SliceLayout(0, acc_layout))  # [BLOCK_M] the tile's group scale
            acc += part * gl.expand_dims(x_s, 0)
            if t == T1 - 1:  # a gate_up column tile done
                cols = (pid + (L // T1) * P) * BLOCK_N + cols0
                out = acc * gl.expand_dims(gl.load(ws1_ptr + cols, mask=cols < n1, other=0.0), 1)
                mask = gl.expand_dims(cols < n1, 1) & gl.expand_dims(row_ok, 0)
                gl.store(out1_ptr + gl.expand_dims(rows, 0) * n1 + gl.expand_dims(cols, 1),
                         out.to(out1_ptr.dtype.element_ty), mask=mask)
                acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, acc_layout)
        else:
            unit = pid + ((L - L1) // T2) * P
            split = unit % SPLIT2
            t = (L - L1) % T2
            x_s = xs2.index(split * T2 + t).load(gl.SliceLayout(0, acc_layout))
            acc += part * gl.expand_dims(x_s, 0)
            if t == T2 - 1:  # a down (column tile, split) done: partial, then the last arriver reduces
                tile = unit // SPLIT2
                cols = tile * BLOCK_N + cols0
                col_ok = cols < n2
                out = acc * gl.expand_dims(gl.load(ws2_ptr + cols, mask=col_ok, other=0.0), 1)
                mask = gl.expand_dims(col_ok, 1) & gl.expand_dims(row_ok, 0)
                tile_part = part2_ptr + gl.expand_dims(rows, 0) * n2 + gl.expand_dims(cols, 1)
                gl.store(tile_part + split * n2, out, mask=mask)
                gl.thread_barrier()
                if gl.atomic_add(count2_ptr + tile, 1, sem="acq_rel", scope="gpu") == SPLIT2 - 1:
                    total = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, acc_layout)
                    for p in gl.static_range(SPLIT2):
                        total += gl.load(tile_part + p * n2, mask=mask, other=0.0, cache_modifier=".cg")
                    gl.store(out2_ptr + gl.expand_dims(rows, 0) * n2 + gl.expand_dims(cols, 1),
                             total.to(out2_ptr.dtype.element_ty), mask=mask)
                    gl.atomic_xchg(count2_ptr + tile, 0, sem="relaxed", scope="gpu")
                acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, acc_layout)
    _pdl_trigger(PDL)
    for slot in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(slot))
    if BARRIER:
        if L_total == L1:  # no phase-2 tile here: the loop never reached the barrier; arrive, others wait on it
            gl.thread_barrier()
            gl.atomic_add(sync_ptr, 1, sem="release", scope="gpu")
        # The last program out resets the barrier for the next launch: every program has passed it by then.
        gl.thread_barrier()
        if gl.atomic_add(sync_ptr + 1, 1, sem="acq_rel", scope="gpu") == P - 1:
            gl.atomic_xchg(sync_ptr, 0, sem="relaxed", scope="gpu")
            gl.atomic_xchg(sync_ptr + 1, 0, sem="relaxed", scope="gpu")


_SCRATCH: dict[torch.device, torch.Tensor] = {}


def two_phase(x1_q, x1_s, w1, w1_s, x2_q, x2_s, w2, w2_s, split2: int = 4, stages: int = 8,
              barrier: bool = True, pdl: bool = True, programs: int | None = None, block_m: int = 16):
    """gate_up-shaped ``x1 @ w1^T`` and down-shaped ``x2 @ w2^T`` (one token each, 128-group activations,
    per-channel weights) in one persistent launch of ``programs`` (default: the SM count)."""
    n1, k1 = w1.shape
    n2, k2 = w2.shape
    device = x1_q.device
    w_layout = gl.NVMMASharedLayout.get_default_for([TILE_N, TILE_K], gl.float8e4nv)
    x_layout = gl.NVMMASharedLayout.get_default_for([block_m, TILE_K], gl.float8e4nv)

    def desc(t, block, layout):
        return TensorDescriptor(t, list(t.shape), list(t.stride()), block, layout)

    if device not in _SCRATCH:  # made once: a memset in every call would sit in the timed graph (runs S1-S6 had it)
        _SCRATCH[device] = torch.zeros(1 << 12, dtype=torch.int32, device=device)
    scratch = _SCRATCH[device]
    out1 = torch.empty((1, n1), dtype=torch.bfloat16, device=device)
    out2 = torch.empty((1, n2), dtype=torch.bfloat16, device=device)
    part2 = torch.empty((split2, 1, n2), dtype=torch.float32, device=device)
    programs = programs or torch.cuda.get_device_properties(device).multi_processor_count
    two_phase_kernel[(programs,)](
        desc(w1, [TILE_N, TILE_K], w_layout), desc(x1_q, [block_m, TILE_K], x_layout), x1_s, w1_s, out1, n1,
        desc(w2, [TILE_N, TILE_K], w_layout), desc(x2_q, [block_m, TILE_K], x_layout), x2_s, w2_s, out2, part2,
        scratch[16:], n2, scratch,
        T1=k1 // TILE_K, T2=k2 // TILE_K // split2, SPLIT2=split2, STAGES=stages,
        MAX1=triton.next_power_of_2(k1 // TILE_K), MAX2=triton.next_power_of_2(k2 // TILE_K), BARRIER=barrier, PDL=pdl,
        num_warps=4, **({"launch_pdl": True} if pdl else {}))
    return out1, out2


def compile_only() -> None:
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    w = torch.empty(256, 1024, dtype=torch.float8_e4m3fn)
    x = torch.empty(1, 1024, dtype=torch.float8_e4m3fn)
    w_desc = TensorDescriptor(w, [256, 1024], [1024, 1], [TILE_N, TILE_K],
                              gl.NVMMASharedLayout.get_default_for([TILE_N, TILE_K], gl.float8e4nv))
    x_desc = TensorDescriptor(x, [1, 1024], [1024, 1], [16, TILE_K],
                              gl.NVMMASharedLayout.get_default_for([16, TILE_K], gl.float8e4nv))
    for barrier, stages in itertools.product((True, False), (4, 8)):
        sig = {"w1_desc": mangle_type(w_desc, True), "x1_desc": mangle_type(x_desc, True), "xs1_ptr": "*fp32",
               "ws1_ptr": "*fp32", "out1_ptr": "*bf16", "n1": "i32",
               "w2_desc": mangle_type(w_desc, True), "x2_desc": mangle_type(x_desc, True), "xs2_ptr": "*fp32",
               "ws2_ptr": "*fp32", "out2_ptr": "*bf16", "part2_ptr": "*fp32", "count2_ptr": "*i32", "n2": "i32",
               "sync_ptr": "*i32"}
        constexprs = {"T1": 32, "T2": 28, "SPLIT2": 4, "STAGES": stages, "MAX1": 32, "MAX2": 128,
                      "BARRIER": barrier, "PDL": True, "num_warps": 4}
        sig.update({name: "constexpr" for name in constexprs})
        kernel = triton.compile(GluonASTSource(two_phase_kernel, sig, constexprs), target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": 4})
        print(f"compiled barrier={barrier} stages={stages}: {kernel.metadata.shared} B shared", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile-only", action="store_true")
    args = parser.parse_args()
    if args.compile_only:
        compile_only()
        return
    from bench.gpu.fp8_gemm import rotating_graph_us
    from radixlm.kernels.fp8_gemm import per_token_group_quant_fp8_triton as quantize
    from radixlm.kernels.fp8_gemv import fp8_gemv

    gen = torch.Generator(device="cuda").manual_seed(13)

    def weight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = (torch.randn(n, k, generator=gen, device="cuda", dtype=torch.bfloat16) * 100).clamp_(-448, 448)
        return w.to(torch.float8_e4m3fn), (0.5 + torch.rand(n, generator=gen, device="cuda")) / (100 * k**0.5)

    pairs = [(weight(28672, 4096), weight(4096, 14336)) for _ in range(2)]  # 2 x 176 MB: every call from HBM
    x1_q, x1_s = quantize(torch.randn(1, 4096, generator=gen, device="cuda", dtype=torch.bfloat16), 128)
    x2_q, x2_s = quantize(torch.randn(1, 14336, generator=gen, device="cuda", dtype=torch.bfloat16), 128)
    ref1 = fp8_gemv(x1_q, x1_s, *pairs[0][0], pdl=False).float()
    ref2 = fp8_gemv(x2_q, x2_s, *pairs[0][1], pdl=False).float()
    weight_bytes = 28672 * 4096 + 4096 * 14336

    def report(label: str, calls) -> None:
        t = rotating_graph_us(calls)
        print(f"{label:60s} {t:7.2f} us ({weight_bytes / t / 1e6:.2f} TB/s)", flush=True)

    print("gate_up (28672 x 4096) then down (4096 x 14336), one token, us per pair in CUDA graphs over 2 weight "
          "copies (352 MB)")
    report("served Triton GEMVs, PDL", [lambda p=p: (fp8_gemv(x1_q, x1_s, *p[0]), fp8_gemv(x2_q, x2_s, *p[1]))
                                        for p in pairs])
    report("Gluon GEMVs (radixlm.kernels.gluon_gemv), PDL",
           [lambda p=p: (gluon_gemv(x1_q, x1_s, *p[0], stages=4, split_k=1, pdl=True),
                         gluon_gemv(x2_q, x2_s, *p[1], stages=4, split_k=4, pdl=True)) for p in pairs])
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    for barrier, stages, split2, per_sm in [*itertools.product((True, False), (4, 8), (2, 4), (1,)),
                                            *itertools.product((True, False), (4,), (2, 4), (2, 3))]:
        kw = dict(split2=split2, stages=stages, barrier=barrier, programs=per_sm * num_sms)
        try:
            out1, out2 = two_phase(x1_q, x1_s, *pairs[0][0], x2_q, x2_s, *pairs[0][1], **kw)
            err1 = ((out1.float() - ref1).norm() / ref1.norm()).item()
            err2 = ((out2.float() - ref2).norm() / ref2.norm()).item()
            report(f"persistent {per_sm}/SM/SM, barrier={barrier} stages={stages} split={split2} (err {err1:.0e} "
                   f"{err2:.0e})",
                   [lambda p=p: two_phase(x1_q, x1_s, *p[0], x2_q, x2_s, *p[1], **kw) for p in pairs])
        except Exception as exc:  # noqa: BLE001 (report, go on)
            print(f"persistent {kw}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}", flush=True)


if __name__ == "__main__":
    main()
