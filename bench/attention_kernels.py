"""Our Triton attention kernels at Llama-3.1-8B layer shapes (32 heads, 8 KV heads, head dim 128, bf16, KV in
16-slot pages scattered over the pool): decode time inside a CUDA graph with the K/V bandwidth it reaches, and
extend (prefill) time with its TFLOP/s next to PyTorch's SDPA on contiguous, unpaged K/V of the same sizes.
MLA decode at DeepSeek-V2-Lite's per-rank shapes: 16 query heads over one latent KV head whose 576-wide rows
are the keys and whose first 512 dims are the values (a view, read once).

    python bench/attention_kernels.py [--cases decode extend mla_decode]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from radixlm.kernels.decode_attention import decode_attention_fwd
from radixlm.kernels.extend_attention import extend_attention_fwd
from roofline import copy_bandwidth  # bench/ is on the path when this runs as a script

HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16
MLA_HEADS, MLA_DK, MLA_DV = 16, 576, 512  # DeepSeek-V2-Lite per rank: kv_lora_rank 512 + rope 64, MQA
DTYPE, DEVICE = torch.bfloat16, "cuda"
DECODE_CASES = [(1, 1024), (1, 6000), (8, 6000), (32, 2048), (64, 6000), (128, 2048), (256, 2048)]
CASES = ("decode", "extend", "mla_decode")


def paged_layout(seq_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(req_to_token [bs, max_len] int32 over randomly placed pages, request rows [bs], pool size in slots)."""
    pages = [-(-n // PAGE) for n in seq_lens]
    order = torch.randperm(sum(pages)) + 1  # page 0 is the padding page
    table = torch.zeros(len(seq_lens), max(seq_lens), dtype=torch.int32)
    used = 0
    for row, (n, p) in enumerate(zip(seq_lens, pages)):
        pos = torch.arange(n)
        table[row, :n] = (order[used + pos // PAGE] * PAGE + pos % PAGE).int()
        used += p
    return table.to(DEVICE), torch.arange(len(seq_lens), device=DEVICE), (sum(pages) + 1) * PAGE


def graph_time_ms(fn, iters: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    return do_bench(graph.replay, warmup=5, rep=50, return_mode="median") / iters


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="which tables to print")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    print(torch.cuda.get_device_name())
    if "decode" in args.cases:
        bench_decode()
    if "extend" in args.cases:
        bench_extend()
    if "mla_decode" in args.cases:
        bench_mla_decode()


def bench_decode() -> None:
    print("decode: GPU time per call in a CUDA graph, 8 KV splits")
    print(f"{'batch':>6} {'context':>8} {'us':>9} {'K/V TB/s':>9}")
    for bs, ctx in DECODE_CASES:
        table, rows, slots = paged_layout([ctx] * bs)
        k = torch.randn(slots, KV_HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
        v = torch.randn_like(k)
        q = torch.randn(bs, HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
        o, seq = torch.empty_like(q), torch.full((bs,), ctx, device=DEVICE)
        mid_o = torch.empty(bs, HEADS, 8, HEAD_DIM, device=DEVICE)
        mid_lse = torch.empty(bs, HEADS, 8, device=DEVICE)
        ms = graph_time_ms(lambda: decode_attention_fwd(q, k, v, o, table, rows, seq, mid_o, mid_lse, HEAD_DIM**-0.5))
        kv_bytes = bs * ctx * KV_HEADS * HEAD_DIM * 2 * 2
        print(f"{bs:>6} {ctx:>8} {ms * 1e3:>9.1f} {kv_bytes / ms / 1e9:>9.2f}")


def bench_extend() -> None:
    print("\nextend: (cached prefix, new tokens) x requests")
    print(f"{'batch':>22} {'ms':>8} {'TFLOP/s':>8} {'SDPA unpaged TFLOP/s':>21}")
    for reqs in ([(0, 8192)], [(4096, 4096)], [(0, 2048)] * 4, [(0, 512)] * 8, [(2000, 500)] * 8):
        table, rows, slots = paged_layout([p + e for p, e in reqs])
        k = torch.randn(slots, KV_HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
        v = torch.randn_like(k)
        tokens = sum(e for _, e in reqs)
        q = torch.randn(tokens, HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
        o = torch.empty_like(q)
        prefix = torch.tensor([p for p, _ in reqs], device=DEVICE)
        extend = torch.tensor([e for _, e in reqs], device=DEVICE)
        starts = torch.cumsum(extend, 0) - extend
        flops = sum(4 * HEADS * HEAD_DIM * (e * p + e * (e + 1) / 2) for p, e in reqs)
        ms = do_bench(lambda: extend_attention_fwd(q, k, v, o, table, rows, prefix, extend, starts,
                                                   max(e for _, e in reqs), HEAD_DIM**-0.5),
                      warmup=5, rep=30, return_mode="median")
        sdpa = ""
        if all(p == 0 for p, _ in reqs):
            b, e = len(reqs), reqs[0][1]
            qq = torch.randn(b, HEADS, e, HEAD_DIM, device=DEVICE, dtype=DTYPE)
            kk = torch.randn(b, KV_HEADS, e, HEAD_DIM, device=DEVICE, dtype=DTYPE)
            ref = do_bench(lambda: F.scaled_dot_product_attention(qq, kk, kk, is_causal=True, enable_gqa=True),
                           warmup=5, rep=30, return_mode="median")
            sdpa = f"{flops / ref / 1e9:.0f}"
        print(f"{str(reqs[0]) + ' x' + str(len(reqs)):>22} {ms:>8.2f} {flops / ms / 1e9:>8.0f} {sdpa:>21}")



def bench_mla_decode() -> None:
    """Bytes read: the 576-wide latent rows once (the values are the first 512 dims of the same rows), next to
    the device-to-device copy bandwidth (read + write), the ceiling of a kernel that streams memory."""
    copy = copy_bandwidth()
    print(f"\nMLA decode ({MLA_HEADS} heads, 1 latent KV head, Dk {MLA_DK}, Dv {MLA_DV} a view): GPU time per call "
          f"in a CUDA graph, 8 KV splits; copy bandwidth {copy / 1e12:.2f} TB/s")
    print(f"{'batch':>6} {'context':>8} {'us':>9} {'K MB':>9} {'K TB/s':>9} {'of copy':>8}")
    for bs, ctx in DECODE_CASES:
        table, rows, slots = paged_layout([ctx] * bs)
        kv = torch.randn(slots, 1, MLA_DK, device=DEVICE, dtype=DTYPE)
        v = kv[..., :MLA_DV]
        q = torch.randn(bs, MLA_HEADS, MLA_DK, device=DEVICE, dtype=DTYPE)
        o, seq = torch.empty(bs, MLA_HEADS, MLA_DV, device=DEVICE, dtype=DTYPE), torch.full((bs,), ctx, device=DEVICE)
        mid_o = torch.empty(bs, MLA_HEADS, 8, MLA_DV, device=DEVICE)
        mid_lse = torch.empty(bs, MLA_HEADS, 8, device=DEVICE)
        ms = graph_time_ms(lambda: decode_attention_fwd(q, kv, v, o, table, rows, seq, mid_o, mid_lse, MLA_DK**-0.5))
        k_bytes = bs * ctx * MLA_DK * 2
        rate = k_bytes / (ms * 1e-3)
        print(f"{bs:>6} {ctx:>8} {ms * 1e3:>9.1f} {k_bytes / 1e6:>9.1f} {rate / 1e12:>9.2f} {rate / copy:>8.0%}")


if __name__ == "__main__":
    main()
