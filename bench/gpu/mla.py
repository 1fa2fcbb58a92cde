"""DeepSeek Multi-head Latent Attention on one GPU, bf16, at DeepSeek-V2-Lite (16 heads per rank, hidden 2048) and
DeepSeek-V3 at TP1 (128 heads, hidden 7168, q LoRA 1536) shapes; latent 512 + rope 64, nope 128, v 128.

(a) MLA decode kernel in CUDA graphs, batch x context: us per call and latent-KV bytes read per second against
    the measured device copy bandwidth; the backend's split plan (``plan_decode_splits`` via
    ``TritonAttnBackend.decode_scratch``, max context 32k as a server would capture) next to the fixed 8 splits
    every batch ran before, and at 128 heads 32-head tiles (``block_h=32``) next to the default 16.
(b) decode at batch 64, context 4k, per layer: absorbed (q_nope x W_UK bmm + MLA decode + x W_UV bmm) against
    non-absorbed (kv_b_proj over every cached token each step + MHA decode kernel over 192/128-dim K/V).
(c) extend, one request: a whole DeepseekV2Attention layer forward (projections included, the same in both) in
    the absorbed and the decompressed form, new tokens x cached prefix, with the relative difference of the two
    forms' outputs (bf16: ~1e-2 expected; random weights), and the multiply-adds the decompressed form saves
    over the layer's heads by the cost model, between whose values for lost and won rows
    ``radixlm.models.mla_extend.DECOMPRESSED_MIN_MACS_SAVED`` is set.
(d) the absorbed products alone (``--enable-fp8-mla-bmm``), tokens x shape, CUDA graph: q_nope x W_UK
    (K = nope 128, N = latent 512) and latent out x W_UV^T (K = 512, N = v 128) as bf16 ``torch.bmm`` (what the
    model runs without the flag) against ``fp8_bmm`` (the activation amax reduction + the Triton kernel with its
    fused quantization, ``default_bmm_config``), with the FP8 result's relative difference from bf16 (E4M3
    rounding: a few %).  ``--tune`` adds, per row, the fastest of a sweep of kernel configs (for
    ``fp8_bmm_kernel.default_bmm_config``).

    python bench/gpu/mla.py [--parts a b c d] [--tune]   (repository root; ~3 minutes on an H200, --tune ~3 more)
    python bench/gpu/mla.py --smoke                (CPU, Triton interpreter, tiny shapes: the script runs)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/, for roofline
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repo

from radixlm.attention.triton_backend import TritonAttnBackend  # noqa: E402
from radixlm.config import ModelConfig  # noqa: E402
from radixlm.core import ForwardBatch, ForwardMode  # noqa: E402
from radixlm.kernels.decode_attention import decode_attention_fwd  # noqa: E402
from radixlm.kernels.fp8_bmm import activation_amax, quantize_per_batch  # noqa: E402
from radixlm.kernels.fp8_bmm_kernel import default_bmm_config, fp8_bmm_triton  # noqa: E402
from radixlm.kernels.gemm_config import GemmConfig  # noqa: E402
from radixlm.mem import KVCacheSpec, create_kv_pool  # noqa: E402
from radixlm.models import mla_extend  # noqa: E402
from radixlm.models.deepseek_v2 import DeepseekV2Attention  # noqa: E402

PAGE = 16
MAX_CONTEXT = 32768  # what the backend's split plan is sized for, as a server with a 32k context would


@dataclass(frozen=True)
class Shape:
    name: str
    heads: int
    hidden: int
    q_lora_rank: int | None
    rank: int = 512
    rope: int = 64
    nope: int = 128
    v: int = 128

    @property
    def dk(self) -> int:
        return self.rank + self.rope


if SMOKE:
    DEVICE, DTYPE = "cpu", torch.float32  # the interpreter's bf16 dot is wrong; fp32 only checks that all runs
    SHAPES = [Shape("tiny-4h", 4, 64, None, 32, 16, 16, 16), Shape("tiny-40h", 40, 64, 24, 32, 16, 16, 16)]
    DECODE_BATCHES, DECODE_CONTEXTS = [1, 3], [40, 150]
    B_BATCH, B_CONTEXT = 2, 50
    EXTEND_NEW, EXTEND_PREFIX = [8, 24], [0, 16]
    BMM_TOKENS = [1, 5]
else:
    DEVICE, DTYPE = "cuda", torch.bfloat16
    SHAPES = [Shape("V2-Lite", 16, 2048, None), Shape("V3", 128, 7168, 1536)]
    DECODE_BATCHES, DECODE_CONTEXTS = [1, 8, 32, 64, 128], [1024, 4096, 16384, 32768]
    B_BATCH, B_CONTEXT = 64, 4096
    EXTEND_NEW, EXTEND_PREFIX = [64, 256, 1024, 4096, 8192], [0, 4096]
    BMM_TOKENS = [1, 8, 16, 32, 64, 128, 256]
MAX_KV_BYTES = 8 << 30


def paged_table(seq_lens: list[int], num_pages: int, gen: torch.Generator) -> torch.Tensor:
    """req_to_token [bs, max_len] int32 over randomly placed pages of a pool of ``num_pages`` (page 0 padding)."""
    pages = [-(-n // PAGE) for n in seq_lens]
    order = torch.randperm(num_pages - 1, generator=gen)[: sum(pages)] + 1
    table = torch.zeros(len(seq_lens), max(seq_lens), dtype=torch.int32)
    used = 0
    for row, (n, p) in enumerate(zip(seq_lens, pages)):
        pos = torch.arange(n)
        table[row, :n] = (order[used + pos // PAGE] * PAGE + pos % PAGE).int()
        used += p
    return table.to(DEVICE)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def graph_time_us(fn, iters: int = 20) -> float:
    """GPU time per call of ``fn`` replayed in a CUDA graph (one call, untimed, under --smoke); NaN, with the
    error printed, where the launch fails (a tile that does not fit the SM), so that the other rows still run."""
    try:
        fn()
        if SMOKE:
            return float("nan")
        from triton.testing import do_bench

        sync()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(iters):
                fn()
        return do_bench(graph.replay, warmup=5, rep=40, return_mode="median") / iters * 1e3
    except Exception as e:  # noqa: BLE001 - reported, and the table goes on
        print(f"  [launch failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}]")
        return float("nan")


def eager_time_ms(fn, reps: int = 3) -> float:
    """Median wall time of ``fn`` after one warm-up call, synchronised (large calls, no graph)."""
    fn()
    if SMOKE:
        return float("nan")
    times = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


# ----------------------------------------------------------------------------------------------- (a) decode kernel
def bench_decode(copy_bw: float) -> None:
    print(f"\n(a) MLA decode kernel, bf16, CUDA graph; latent bytes read / s as a share of copy bandwidth "
          f"({copy_bw / 1e12:.2f} TB/s); plan = the backend's split plan (max context {MAX_CONTEXT})")
    tokens = max(bs * ctx for bs in DECODE_BATCHES for ctx in DECODE_CONTEXTS
                 if bs * ctx * SHAPES[0].dk * 2 <= MAX_KV_BYTES)
    num_pages = tokens // PAGE + max(DECODE_BATCHES) + 1
    gen = torch.Generator().manual_seed(0)
    kv = torch.randn(num_pages * PAGE, 1, SHAPES[0].dk, dtype=DTYPE, device=DEVICE)  # one pool for every case
    for shape in SHAPES:
        assert shape.dk == kv.shape[-1]
        spec = KVCacheSpec.mla(1, shape.rank, shape.rope, DTYPE)
        backend = TritonAttnBackend(shape.heads, spec, max(DECODE_BATCHES), DEVICE, max_context_len=MAX_CONTEXT,
                                    num_sms=32 if SMOKE else None)
        wide = shape.heads >= 32
        print(f"\n{shape.name} ({shape.heads} heads)")
        print(f"{'batch':>6} {'context':>8} {'KV MB':>7} {'splits':>6} {'plan us':>9} {'TB/s':>6} {'of copy':>8} "
              f"{'8-split us':>10} {'of copy':>8}" + (f" {'32-head us':>10} {'of copy':>8}" if wide else ""))
        for bs in DECODE_BATCHES:
            for ctx in DECODE_CONTEXTS:
                kv_bytes = bs * ctx * shape.dk * kv.element_size()
                if kv_bytes > MAX_KV_BYTES:
                    continue
                table = paged_table([ctx] * bs, num_pages, gen)
                rows = torch.arange(bs, device=DEVICE)
                seq = torch.full((bs,), ctx, device=DEVICE)
                q = torch.randn(bs, shape.heads, shape.dk, dtype=DTYPE, device=DEVICE)
                o = torch.empty(bs, shape.heads, shape.rank, dtype=DTYPE, device=DEVICE)
                v = kv[..., : shape.rank]
                mid_o, mid_lse = backend.decode_scratch(bs)
                fixed_o = torch.empty(bs, shape.heads, 8, shape.rank, device=DEVICE)
                fixed_lse = torch.empty(bs, shape.heads, 8, device=DEVICE)

                def run(mo, ml, block_h=None):
                    return lambda: decode_attention_fwd(q, kv, v, o, table, rows, seq, mo, ml, shape.dk**-0.5,
                                                        block_h=block_h)

                cols = [graph_time_us(run(mid_o, mid_lse)), graph_time_us(run(fixed_o, fixed_lse))]
                if wide:
                    cols.append(graph_time_us(run(mid_o, mid_lse, 32)))
                line = f"{bs:>6} {ctx:>8} {kv_bytes / 1e6:>7.0f} {mid_o.shape[2]:>6}"
                for i, us in enumerate(cols):
                    rate = kv_bytes / (us * 1e-6)
                    line += f" {us:>9.1f}" + (f" {rate / 1e12:>6.2f}" if i == 0 else "") + f" {rate / copy_bw:>8.0%}"
                print(line)
                del fixed_o, fixed_lse


# ---------------------------------------------------------------------------------- (b) absorbed vs non-absorbed
def bench_absorbed_decode() -> None:
    bs, ctx = B_BATCH, B_CONTEXT
    print(f"\n(b) decode per layer, batch {bs}, context {ctx}: absorbed (W_UK bmm + MLA decode + W_UV bmm) vs "
          f"non-absorbed (kv_b_proj over all {bs * ctx} cached tokens every step + MHA decode, 192/128 dims)")
    print(f"{'shape':>8} {'absorbed us':>12} {'tok/s':>10} {'non-abs. us':>12} {'tok/s':>10} {'ratio':>7}")
    gen = torch.Generator().manual_seed(1)
    for shape in SHAPES:
        h = shape.heads
        num_pages = bs * ctx // PAGE + bs + 1
        kv = torch.randn(num_pages * PAGE, 1, shape.dk, dtype=DTYPE, device=DEVICE)
        table = paged_table([ctx] * bs, num_pages, gen)
        rows = torch.arange(bs, device=DEVICE)
        seq = torch.full((bs,), ctx, device=DEVICE)
        w_kv_b = torch.randn(h * (shape.nope + shape.v), shape.rank, dtype=DTYPE, device=DEVICE) * 0.02
        w_uk, w_uv = w_kv_b.view(h, shape.nope + shape.v, shape.rank).split([shape.nope, shape.v], dim=1)
        q_nope = torch.randn(bs, h, shape.nope, dtype=DTYPE, device=DEVICE)
        q_pe = torch.randn(bs, h, shape.rope, dtype=DTYPE, device=DEVICE)
        spec = KVCacheSpec.mla(1, shape.rank, shape.rope, DTYPE)
        backend = TritonAttnBackend(h, spec, bs, DEVICE, max_context_len=MAX_CONTEXT)
        mid_o, mid_lse = backend.decode_scratch(bs)
        o_lat = torch.empty(bs, h, shape.rank, dtype=DTYPE, device=DEVICE)

        def absorbed():
            q_lat = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)
            q = torch.cat([q_lat, q_pe], dim=-1)
            decode_attention_fwd(q, kv, kv[..., : shape.rank], o_lat, table, rows, seq, mid_o, mid_lse,
                                 (shape.nope + shape.rope) ** -0.5)
            return torch.bmm(o_lat.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)

        # Non-absorbed: every cached token's K/V rebuilt per step into a contiguous per-request layout.
        slots = table.long().flatten()  # [bs * ctx]
        flat_table = torch.arange(bs * ctx, device=DEVICE, dtype=torch.int32).view(bs, ctx)
        mha_mid_o = torch.empty(bs, h, 8, shape.v, device=DEVICE)
        mha_mid_lse = torch.empty(bs, h, 8, device=DEVICE)
        o_mha = torch.empty(bs, h, shape.v, dtype=DTYPE, device=DEVICE)
        q_full = torch.cat([q_nope, q_pe], dim=-1)

        def non_absorbed():
            lat = kv[slots, 0]  # [bs * ctx, 576]
            kvb = (lat[:, : shape.rank] @ w_kv_b.t()).view(-1, h, shape.nope + shape.v)
            k = torch.cat([kvb[..., : shape.nope], lat[:, None, shape.rank:].expand(-1, h, -1)], dim=-1)
            decode_attention_fwd(q_full, k, kvb[..., shape.nope:], o_mha, flat_table, rows, seq, mha_mid_o,
                                 mha_mid_lse, (shape.nope + shape.rope) ** -0.5)
            return o_mha

        t_abs = graph_time_us(absorbed)
        try:
            t_non = eager_time_ms(non_absorbed) * 1e3
        except torch.OutOfMemoryError:
            t_non = float("nan")
        if DEVICE == "cuda":
            torch.cuda.empty_cache()  # the non-absorbed temporaries of V3 are ~30 GB
        print(f"{shape.name:>8} {t_abs:>12.1f} {bs / (t_abs * 1e-6):>10.0f} {t_non:>12.1f} "
              f"{bs / (t_non * 1e-6):>10.0f} {t_non / t_abs:>6.1f}x")
        del kv


# ------------------------------------------------------------------------------------ (c) extend, the two forms
def make_layer(shape: Shape) -> DeepseekV2Attention:
    hf = dict(architectures=["DeepseekV2ForCausalLM"], vocab_size=1000, hidden_size=shape.hidden,
              intermediate_size=4 * shape.hidden, num_hidden_layers=1, num_attention_heads=shape.heads,
              kv_lora_rank=shape.rank, q_lora_rank=shape.q_lora_rank, qk_nope_head_dim=shape.nope,
              qk_rope_head_dim=shape.rope, v_head_dim=shape.v, max_position_embeddings=MAX_CONTEXT,
              rope_theta=10000.0, torch_dtype="bfloat16")
    cfg = ModelConfig.from_hf("/nonexistent", "float32" if SMOKE else "bfloat16", DEVICE, hf_config=hf)
    with torch.device(DEVICE):
        layer = DeepseekV2Attention(cfg, 0)
    for p in layer.parameters():
        p.data.normal_(0.0, 0.02)
    for name, p in layer.named_parameters():
        if "layernorm" in name:
            p.data.fill_(1.0)
    return layer


def extend_batch(shape: Shape, prefix: int, new: int, layer: DeepseekV2Attention) -> ForwardBatch:
    """One request of ``prefix`` cached + ``new`` tokens over a fresh pool (the prefix's latents random)."""
    total = prefix + new
    spec = KVCacheSpec.mla(1, shape.rank, shape.rope, DTYPE)
    pool = create_kv_pool(spec, -(-total // PAGE) * PAGE + PAGE, PAGE, DEVICE)
    pool.kv_buffers[0].normal_()
    table = (torch.arange(total, device=DEVICE, dtype=torch.int32) + PAGE)[None, :]  # slots after the pad page
    backend = TritonAttnBackend(shape.heads, spec, 1, DEVICE, max_context_len=MAX_CONTEXT)
    fb = ForwardBatch(
        forward_mode=ForwardMode.EXTEND, batch_size=1,
        input_ids=torch.zeros(new, dtype=torch.int64, device=DEVICE),
        positions=torch.arange(prefix, total, device=DEVICE), req_pool_indices=torch.zeros(1, dtype=torch.int64,
                                                                                           device=DEVICE),
        seq_lens=torch.tensor([total], device=DEVICE), seq_lens_cpu=[total],
        out_cache_loc=table[0, prefix:].long(), req_to_token_pool=SimpleNamespace(req_to_token=table),
        kv_pool=pool, attn_backend=backend,
        extend_prefix_lens=torch.tensor([prefix], device=DEVICE), extend_seq_lens=torch.tensor([new], device=DEVICE),
        extend_start_loc=torch.zeros(1, dtype=torch.int64, device=DEVICE), extend_prefix_lens_cpu=[prefix],
        extend_seq_lens_cpu=[new],
    )
    backend.init_forward_metadata(fb)
    return fb


def bench_extend() -> None:
    print("\n(c) extend, one request: DeepseekV2Attention layer forward (projections included), ms; "
          f"auto = what the rule picks at DECOMPRESSED_MIN_MACS_SAVED = {mla_extend.DECOMPRESSED_MIN_MACS_SAVED:.3g}; "
          f"saved = modelled multiply-adds saved over the layer's heads")
    print(f"{'shape':>8} {'prefix':>7} {'new':>6} {'absorbed':>9} {'decomp.':>9} {'speed-up':>9} {'faster':>8} "
          f"{'MAC model':>9} {'saved G':>8} {'auto':>8} {'rel diff':>9}")
    for shape in SHAPES:
        layer = make_layer(shape)
        for prefix in EXTEND_PREFIX:
            first_win = None
            for new in EXTEND_NEW:
                fb = extend_batch(shape, prefix, new, layer)
                hidden = torch.randn(new, shape.hidden, dtype=layer.kv_b_proj.weight.dtype, device=DEVICE) * 0.1
                times, outs = {}, {}
                for path in ("absorbed", "decompressed"):
                    layer.extend_path = path
                    with torch.inference_mode():
                        outs[path] = layer(fb.positions, hidden, fb).float()
                        times[path] = eager_time_ms(lambda: layer(fb.positions, hidden, fb))
                diff = ((outs["absorbed"] - outs["decompressed"]).norm() / outs["absorbed"].norm()).item()
                layer.extend_path = "auto"
                auto = "decomp." if mla_extend.use_decompressed(fb, "auto", layer.dims, layer.num_heads) else "absorbed"
                a, d = mla_extend.mla_extend_macs([prefix], [new], layer.dims)
                saved = (a - d) * layer.num_heads / 1e9
                faster = "decomp." if times["decompressed"] < times["absorbed"] else "absorbed"
                if faster == "decomp." and first_win is None:
                    first_win = new
                print(f"{shape.name:>8} {prefix:>7} {new:>6} {times['absorbed']:>9.2f} {times['decompressed']:>9.2f} "
                      f"{times['absorbed'] / times['decompressed']:>8.2f}x {faster:>8} {a / d:>8.2f}x {saved:>8.1f} {auto:>8} "
                      f"{diff:>9.1e}")
                del fb
            print(f"{shape.name:>8} prefix {prefix}: decompressed faster from {first_win} new tokens on"
                  if first_win else f"{shape.name:>8} prefix {prefix}: absorbed faster at every size measured")
        del layer
    print("\nDECOMPRESSED_MIN_MACS_SAVED belongs between the largest 'saved G' of a row the absorbed form won and the "
          "smallest of a row the decompressed form won")


# ------------------------------------------------------------------------------- (d) FP8 absorbed products
def bmm_sweep() -> list[GemmConfig]:
    """Kernel configs tried by --tune (an fp8 dot needs block_k >= 32 on a GPU)."""
    if SMOKE:
        return [GemmConfig(16, 16, 32), GemmConfig(32, 16, 32, num_stages=2)]
    return [GemmConfig(bm, bn, bk, num_warps=4, num_stages=stages)
            for bm in (16, 32, 64) for bn in (32, 64, 128) for bk in (64, 128) for stages in (3, 4)]


def bench_fp8_bmm(tune: bool) -> None:
    print("\n(d) absorbed products, CUDA graph, us: bf16 torch.bmm vs FP8 (amax + Triton kernel, default config); "
          "rel = ||fp8 - bf16|| / ||bf16||" + ("; tuned = fastest of the sweep" if tune else ""))
    head = f"{'shape':>8} {'product':>8} {'tokens':>6} {'bf16 us':>8} {'fp8 us':>8} {'speed-up':>8} {'rel':>8}"
    print(head + (f" {'tuned us':>9} {'speed-up':>8}  tuned config (m, n, k, warps, stages)" if tune else ""))
    gen = torch.Generator().manual_seed(3)
    sweep = bmm_sweep() if tune else []
    for shape in SHAPES:
        h = shape.heads
        w_kv_b = (torch.randn(h * (shape.nope + shape.v), shape.rank, generator=gen) * 0.02).to(DEVICE, DTYPE)
        w_uk, w_uv = w_kv_b.view(h, shape.nope + shape.v, shape.rank).split([shape.nope, shape.v], dim=1)
        (uk_q, uk_s), (uv_q, uv_s) = quantize_per_batch(w_uk.transpose(1, 2)), quantize_per_batch(w_uv)
        totals = {"bf16": 0.0, "fp8": 0.0}
        for tokens in BMM_TOKENS:
            # q_nope: a view of q [tokens, heads, nope + rope], as the model slices it
            q = torch.randn(tokens, h, shape.nope + shape.rope, generator=gen).to(DEVICE, DTYPE)
            q_nope = q[..., : shape.nope]
            o_lat = torch.randn(tokens, h, shape.rank, generator=gen).to(DEVICE, DTYPE)
            cases = [("W_UK", q_nope, uk_q, uk_s, lambda: torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)),
                     ("W_UV", o_lat, uv_q, uv_s,
                      lambda: torch.bmm(o_lat.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1))]
            for name, x, w_q, w_s, bf16 in cases:
                def fp8(config=None, x=x, w_q=w_q, w_s=w_s):
                    return fp8_bmm_triton(x, activation_amax(x), w_q, w_s, DTYPE, config)

                t_bf16, t_fp8 = graph_time_us(bf16), graph_time_us(fp8)
                totals["bf16"] += t_bf16
                totals["fp8"] += t_fp8
                ref = bf16().float()
                diff = ((fp8().float() - ref).norm() / ref.norm()).item()
                line = (f"{shape.name:>8} {name:>8} {tokens:>6} {t_bf16:>8.1f} {t_fp8:>8.1f} {t_bf16 / t_fp8:>7.2f}x "
                        f"{diff:>8.1e}")
                if tune:
                    timed = [(graph_time_us(lambda c=c: fp8(c)), c) for c in sweep]
                    best_t, best = min(timed, key=lambda tc: (tc[0] != tc[0], tc[0]))  # NaN (failed) last
                    line += (f" {best_t:>9.1f} {t_bf16 / best_t:>7.2f}x  ({best.block_m}, {best.block_n}, "
                             f"{best.block_k}, {best.num_warps}, {best.num_stages})")
                    default = default_bmm_config(tokens, w_q.shape[1], w_q.shape[2])
                    line += "  = default" if best == default else ""
                print(line)
        print(f"{shape.name:>8} sum over the rows: bf16 {totals['bf16']:.1f} us, fp8 {totals['fp8']:.1f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=["a", "b", "c", "d"], default=["a", "b", "c", "d"])
    parser.add_argument("--tune", action="store_true", help="(d): also sweep the FP8 kernel's configs")
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    if DEVICE == "cuda":
        from roofline import copy_bandwidth

        print(torch.cuda.get_device_name(), f"{torch.cuda.get_device_properties(0).multi_processor_count} SMs")
        copy_bw = copy_bandwidth()
    else:
        copy_bw = 1.0
    if "a" in args.parts:
        bench_decode(copy_bw)
    if "b" in args.parts:
        bench_absorbed_decode()
    if "c" in args.parts:
        bench_extend()
    if "d" in args.parts:
        bench_fp8_bmm(args.tune)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
