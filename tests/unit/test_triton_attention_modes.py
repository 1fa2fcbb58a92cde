"""The Triton attention kernels' two extra modes against an independent float64 reference: extend with a custom
mask over the new tokens (speculative-decoding verification of a draft tree), and keys wider than values with V
possibly a strided view into the K buffer (DeepSeek MLA's latent cache: 576-wide keys, values its first 512 dims).

Without a GPU the kernels run under Triton's interpreter, which is slow: shapes stay small.
"""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported: decoration picks the mode

import pytest

from radixlm.kernels.decode_attention import (MAX_KV_SPLITS, MLA_MIN_SPLIT_LEN, decode_attention_fwd, head_blocks,
                                              plan_decode_splits, v_is_k_prefix)
from radixlm.kernels.extend_attention import extend_attention_fwd
from test_triton_attention import CUDA, DEVICE, DTYPES, TOLERANCE, kv_layout, rel_err

MLA_DK, MLA_DV = 576, 512  # kv_lora_rank 512 + qk_rope_head_dim 64; values are the latent part


def seed(*key) -> torch.Generator:
    """A generator seeded by the case, the same in every process (str hashes are salted per process)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def make_kv(num_slots: int, num_kv_heads: int, dk: int, dv: int, dtype: torch.dtype, v_mode: str,
            gen: torch.Generator, row_pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """K [num_slots, num_kv_heads, dk] and V [num_slots, num_kv_heads, dv].  ``v_mode``: "separate" buffers;
    "view": V is ``K[..., :dv]`` (the MLA latent layout); "tail_view": V is ``K[..., dk - dv:]``, a strided view
    that does not start at K's first dim.  ``row_pad`` widens the underlying rows, so K itself is strided."""
    store = torch.randn((num_slots, num_kv_heads, dk + row_pad), generator=gen).to(DEVICE, dtype)
    k = store[..., :dk]
    if v_mode == "separate":
        return k, torch.randn((num_slots, num_kv_heads, dv), generator=gen).to(DEVICE, dtype)
    return k, (k[..., :dv] if v_mode == "view" else k[..., dk - dv :])


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
              sm_scale: float) -> torch.Tensor:
    """float64 softmax(q K^T * sm_scale) V of one request: q [n, heads, dk]; K [seq, kv_heads, dk] and
    V [seq, kv_heads, dv] hold its keys by position; query row r sees key s where ``allowed[r, s]``."""
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = torch.einsum("nhd,shd->hns", q.double(), k) * sm_scale
    return torch.einsum("hns,shd->nhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)


def random_tree_mask(n: int, gen: torch.Generator) -> torch.Tensor:
    """[n, n] bool: token 0 is the root, token j > 0 hangs under a random earlier token; each token sees its
    ancestors and itself."""
    mask = torch.eye(n, dtype=torch.bool)
    for j in range(1, n):
        parent = int(torch.randint(0, j, (1,), generator=gen))
        mask[j] |= mask[parent]
    return mask


def chain_mask(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.ones((n, n), dtype=torch.bool).tril()


def dense_random_mask(n: int, gen: torch.Generator) -> torch.Tensor:
    """Any pattern with the diagonal set: tokens also see later tokens."""
    return (torch.rand((n, n), generator=gen) < 0.5) | torch.eye(n, dtype=torch.bool)


def run_extend(reqs: list[tuple[int, int]], heads: tuple[int, int, int, int], dtype: torch.dtype, page_size: int,
               window: int | None = None, make_mask=None, v_mode: str = "separate", row_pad: int = 0,
               mask_dtype: torch.dtype = torch.bool, check_v_from_k: bool | None = None) -> torch.Tensor:
    """Extend ``reqs`` ((prefix_len, extend_len) each) with heads (num_heads, num_kv_heads, dk, dv); with
    ``make_mask(n, gen)`` giving each request's [n, n] custom mask.  Checks every request against the reference
    and returns the output."""
    num_heads, num_kv_heads, dk, dv = heads
    # Masks are drawn after the inputs, so a masked run sees the same inputs as the unmasked one.
    gen = seed("extend", reqs, heads, dtype, page_size, window, v_mode)
    table, rows, num_slots = kv_layout([p + e for p, e in reqs], page_size, gen)
    k_buf, v_buf = make_kv(num_slots, num_kv_heads, dk, dv, dtype, v_mode, gen, row_pad)
    if check_v_from_k is not None:  # which kernel path the shapes take
        assert v_is_k_prefix(k_buf, v_buf, *head_blocks(dk, dv)[:2]) == check_v_from_k
    prefix_lens = torch.tensor([p for p, _ in reqs], device=DEVICE)
    extend_lens = torch.tensor([e for _, e in reqs], device=DEVICE)
    starts = torch.cumsum(extend_lens, 0) - extend_lens
    q = torch.randn((int(extend_lens.sum()), num_heads, dk), generator=gen).to(DEVICE, dtype)
    o = torch.full((q.shape[0], num_heads, dv), float("nan"), device=DEVICE, dtype=dtype)
    custom_mask = mask_indptr = None
    masks = []
    if make_mask is not None:
        # Blocks in reverse request order with junk between them: the kernel must follow mask_indptr.
        masks = [make_mask(e, gen) for _, e in reqs]
        pieces, indptr, at = [], [0] * len(reqs), 0
        for i in reversed(range(len(reqs))):
            junk = torch.rand(3, generator=gen) < 0.5
            pieces += [junk, masks[i].flatten()]
            indptr[i] = at + 3
            at += 3 + masks[i].numel()
        custom_mask = torch.cat(pieces).to(DEVICE, mask_dtype)
        mask_indptr = torch.tensor(indptr, device=DEVICE)
    sm_scale = dk**-0.5
    extend_attention_fwd(q, k_buf, v_buf, o, table, rows, prefix_lens, extend_lens, starts, max(e for _, e in reqs),
                         sm_scale, window, custom_mask=custom_mask, mask_indptr=mask_indptr)
    assert o.dtype == dtype and not o.isnan().any()
    for i, (prefix, ext) in enumerate(reqs):
        slots = table[rows[i], : prefix + ext].long()
        q_pos = torch.arange(prefix, prefix + ext)[:, None]
        key_pos = torch.arange(prefix + ext)[None, :]
        allowed = key_pos <= q_pos
        if make_mask is not None:
            allowed = (key_pos < prefix).expand(ext, -1).clone()  # the prefix, then the custom mask
            allowed[:, prefix:] = masks[i]
        if window is not None:
            allowed &= key_pos > q_pos - window
        start = int(starts[i])
        ref = reference(q[start : start + ext], k_buf[slots], v_buf[slots], allowed.to(DEVICE), sm_scale)
        assert rel_err(o[start : start + ext], ref) < TOLERANCE[dtype], f"request {i} (prefix {prefix}, new {ext})"
    return o


def run_decode(seq_lens: list[int], heads: tuple[int, int, int, int], dtype: torch.dtype, page_size: int,
               window: int | None = None, v_mode: str = "separate", row_pad: int = 0, num_kv_splits: int = 4,
               check_v_from_k: bool | None = None, block_h: int | None = None) -> None:
    num_heads, num_kv_heads, dk, dv = heads
    gen = seed("decode", seq_lens, heads, dtype, page_size, window, v_mode)
    table, rows, num_slots = kv_layout(seq_lens, page_size, gen)
    k_buf, v_buf = make_kv(num_slots, num_kv_heads, dk, dv, dtype, v_mode, gen, row_pad)
    if check_v_from_k is not None:
        assert v_is_k_prefix(k_buf, v_buf, *head_blocks(dk, dv)[:2]) == check_v_from_k
    bs = len(seq_lens)
    q = torch.randn((bs, num_heads, dk), generator=gen).to(DEVICE, dtype)
    o = torch.full((bs, num_heads, dv), float("nan"), device=DEVICE, dtype=dtype)
    # Scratch for a larger batch, sliced as the backend does, and poisoned: empty splits must not leak NaN.
    mid_o = torch.full((bs + 2, num_heads, num_kv_splits, dv), float("nan"), device=DEVICE)
    mid_lse = torch.full((bs + 2, num_heads, num_kv_splits), float("nan"), device=DEVICE)
    sm_scale = dk**-0.5
    decode_attention_fwd(q, k_buf, v_buf, o, table, rows, torch.tensor(seq_lens, device=DEVICE), mid_o[:bs],
                         mid_lse[:bs], sm_scale, window, block_h=block_h)
    assert o.dtype == dtype and not o.isnan().any()
    for i, n in enumerate(seq_lens):
        slots = table[rows[i], :n].long()
        allowed = torch.ones((1, n), dtype=torch.bool)
        if window is not None:
            allowed[:, : max(n - window, 0)] = False
        ref = reference(q[i : i + 1], k_buf[slots], v_buf[slots], allowed.to(DEVICE), sm_scale)
        assert rel_err(o[i : i + 1], ref) < TOLERANCE[dtype], f"request {i} (seq_len {n})"


# ---------------------------------------------------------------- keys wider than values (MLA)


def test_head_blocks() -> None:
    assert head_blocks(576, 512) == (512, 64, 512)  # MLA: 512 + 64 instead of 1024
    assert head_blocks(192, 128) == (128, 64, 128)
    assert head_blocks(96, 64) == (64, 32, 64)
    assert head_blocks(520, 512) == (512, 16, 512)  # remainders below tl.dot's 16 are padded to 16
    assert head_blocks(112, 64) == (128, 0, 64)  # 64 + 64 would save nothing
    assert head_blocks(96, 96) == (128, 0, 128)  # equal widths keep their single padded block
    assert head_blocks(128, 64) == (128, 0, 64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v_mode,page_size", [("view", 1), ("separate", 4)])
def test_mla_decode(dtype: torch.dtype, page_size: int, v_mode: str) -> None:
    # 16 query heads over one latent KV head (DeepSeek-V2-Lite per rank); 1, 37, 80 keys: one key, a partial
    # block, several blocks over the splits.
    run_decode([1, 37, 80], (16, 1, MLA_DK, MLA_DV), dtype, page_size, v_mode=v_mode,
               check_v_from_k=v_mode == "view")


@pytest.mark.parametrize("num_heads", [4, 20])
def test_mla_decode_head_blocks(num_heads: int) -> None:
    # 4 heads pad the 16-row head tile; 20 take two head tiles, the second partial
    run_decode([5, 33], (num_heads, 1, MLA_DK, MLA_DV), torch.float16, 4, v_mode="view", num_kv_splits=2)


def test_mla_decode_many_splits() -> None:
    # The split counts small MLA batches get (plan_decode_splits): 16 splits over 300 keys give each non-empty
    # split MLA_MIN_SPLIT_LEN keys (3 live, 13 empty), and stage 2 merges them in two chunks of 8; a 1-key and a
    # 129-key request (a second split of one key) in the same launch.
    assert MLA_MIN_SPLIT_LEN == 128
    run_decode([300, 1, 129], (16, 1, MLA_DK, MLA_DV), torch.float16, 4, v_mode="view", num_kv_splits=16)
    run_decode([200], (16, 1, MLA_DK, MLA_DV), torch.float32, 1, v_mode="separate", num_kv_splits=MAX_KV_SPLITS)


def test_mla_decode_wide_head_tile() -> None:
    # 32-head tiles (block_h override, 8 warps) over 40 heads: one full tile and one partial
    run_decode([70, 9], (40, 1, MLA_DK, MLA_DV), torch.float16, 4, v_mode="view", num_kv_splits=2, block_h=32)


def test_plan_decode_splits() -> None:
    def plan(bs: int, heads: int, ctx: int, sms: int = 132, cap: int = 1 << 20) -> int:
        return plan_decode_splits(bs, 1, heads, MLA_DK, MLA_DV, 2, ctx, sms, cap)

    # V2-Lite (16 heads, one tile): batch 1 fills 2 x 132 SMs as far as the context allows
    assert plan(1, 16, 32768) == MAX_KV_SPLITS  # 264 wanted, capped
    assert plan(1, 16, 4096) == 4096 // MLA_MIN_SPLIT_LEN
    assert plan(8, 16, 32768) == 32  # 33 wanted, rounded down to a power of two
    assert plan(32, 16, 32768) == 8
    assert [plan(bs, 16, 32768) for bs in (64, 128, 256)] == [8, 8, 8]  # large batches keep the default
    # V3 at TP1: 128 heads, 8 tiles of 16
    assert plan(1, 128, 32768) == 32 and plan(8, 128, 32768) == 8
    assert plan(1, 16, 100) == 8  # short contexts: never below the default...
    assert plan(1, 16, 32768, cap=5) == 5  # ...except where the scratch holds fewer
    # GQA shapes through the same rule: 32 heads over 8 KV heads, head dim 128 (64-row head tile padded)
    assert plan_decode_splits(1, 8, 4, 128, 128, 2, 32768, 132, 1 << 20) == 32


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v_mode,page_size", [("view", 4), ("separate", 1)])
def test_mla_extend(dtype: torch.dtype, page_size: int, v_mode: str) -> None:
    run_extend([(0, 9), (20, 40), (33, 1)], (4, 1, MLA_DK, MLA_DV), dtype, page_size, v_mode=v_mode,
               check_v_from_k=v_mode == "view")


# Dk 96 / Dv 64 over 2 KV heads: split 64 + 32.  "view" with padded rows: K and V both strided, V the main key
# block (the kernels reuse the K tile); "tail_view": V a strided view that does not start the row (loaded).
UNEQUAL = [("view", 4, True), ("tail_view", 0, False), ("separate", 0, False)]


@pytest.mark.parametrize("v_mode,row_pad,v_from_k", UNEQUAL, ids=[u[0] for u in UNEQUAL])
@pytest.mark.parametrize("page_size,window", [(1, None), (4, 5)])
def test_unequal_decode(v_mode: str, row_pad: int, v_from_k: bool, page_size: int, window: int | None) -> None:
    run_decode([1, 17, 70], (6, 2, 96, 64), torch.float16, page_size, window, v_mode, row_pad,
               check_v_from_k=v_from_k)


@pytest.mark.parametrize("v_mode,row_pad,v_from_k", UNEQUAL, ids=[u[0] for u in UNEQUAL])
@pytest.mark.parametrize("page_size,window", [(1, None), (4, 7)])
def test_unequal_extend(v_mode: str, row_pad: int, v_from_k: bool, page_size: int, window: int | None) -> None:
    run_extend([(0, 70), (20, 45), (5, 1)], (6, 2, 96, 64), torch.float16, page_size, window, v_mode=v_mode,
               row_pad=row_pad, check_v_from_k=v_from_k)


def test_unequal_fp32() -> None:
    # DeepSeek's decompressed prefill widths (192 = 128 + 64 keys, 128 values), fp32
    run_extend([(0, 30), (9, 12)], (4, 2, 192, 128), torch.float32, 1, window=6)
    run_decode([3, 50], (4, 2, 192, 128), torch.float32, 1)
    run_extend([(9, 12), (0, 7)], (6, 2, 96, 64), torch.float32, 4, v_mode="view")


@pytest.mark.skipif(not CUDA, reason="GPU-sized MLA shapes are too slow for the interpreter")
def test_mla_gpu_sizes() -> None:
    # 128 heads (DeepSeek-V3 at TP=1): eight 16-head tiles; long contexts over the splits
    run_decode([4096, 1000, 2], (128, 1, MLA_DK, MLA_DV), torch.bfloat16, 16, v_mode="view", num_kv_splits=8)
    # the split plan's batch of one: 128 splits over 20k keys (V2-Lite), 33 over 5k (V3), a 32-head tile
    run_decode([20000], (16, 1, MLA_DK, MLA_DV), torch.bfloat16, 16, v_mode="view", num_kv_splits=MAX_KV_SPLITS)
    run_decode([5000], (128, 1, MLA_DK, MLA_DV), torch.bfloat16, 16, v_mode="view", num_kv_splits=33)
    run_decode([3000, 7], (128, 1, MLA_DK, MLA_DV), torch.bfloat16, 16, v_mode="view", block_h=32)
    run_extend([(3000, 64), (0, 500)], (16, 1, MLA_DK, MLA_DV), torch.bfloat16, 16, v_mode="view")


# ---------------------------------------------------------------- custom mask (target verify)

# (prefix_len, extend_len): no prefix; a prefix of a partial key block; one new token; a prefix of whole key
# blocks, then new tokens over two key blocks.
VERIFY_REQS = [(0, 9), (13, 16), (40, 1), (64, 37)]


@pytest.mark.parametrize("page_size,window", [(1, None), (4, 7)])
def test_chain_mask_equals_causal(page_size: int, window: int | None) -> None:
    reqs = VERIFY_REQS + [(3, 70)]  # 70: two query blocks
    heads = (4, 2, 32, 32)
    masked = run_extend(reqs, heads, torch.float32, page_size, window, make_mask=chain_mask)
    causal = run_extend(reqs, heads, torch.float32, page_size, window)  # same seed: same inputs
    assert rel_err(masked, causal.double()) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("heads", [(4, 4, 32, 32), (6, 2, 64, 64)], ids=["group1", "group3"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", [1, 4])
def test_tree_mask(heads: tuple[int, int, int, int], dtype: torch.dtype, page_size: int) -> None:
    run_extend(VERIFY_REQS, heads, dtype, page_size, make_mask=random_tree_mask)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8])
def test_mask_not_lower_triangular(mask_dtype: torch.dtype) -> None:
    # Tokens see later tokens; 70 new tokens: query blocks other than the first also visit every new key.
    run_extend([(0, 12), (21, 70), (5, 2)], (6, 3, 32, 32), torch.float32, 4, make_mask=dense_random_mask,
               mask_dtype=mask_dtype)


def test_tree_mask_with_window() -> None:
    run_extend(VERIFY_REQS, (6, 2, 32, 32), torch.float32, 1, window=10, make_mask=random_tree_mask)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tree_mask_wide_keys(dtype: torch.dtype) -> None:
    # what MLA target verification runs: a draft tree over the latent cache; and Dk 96 / Dv 64 in fp32
    run_extend([(17, 8), (0, 5), (40, 16)], (4, 1, MLA_DK, MLA_DV), dtype, 4, make_mask=random_tree_mask,
               v_mode="view")
    run_extend([(9, 12), (0, 7)], (6, 2, 96, 64), torch.float32, 4, make_mask=random_tree_mask, v_mode="view")


@pytest.mark.skipif(not CUDA, reason="GPU-sized MLA shapes are too slow for the interpreter")
def test_tree_mask_gpu_sizes() -> None:
    # DeepSeek-V3's 128 heads verifying 64- and 33-token trees after long prefixes
    run_extend([(3000, 64), (100, 33)], (128, 1, MLA_DK, MLA_DV), torch.bfloat16, 16, make_mask=random_tree_mask,
               v_mode="view")


def test_backend_decode_scratch() -> None:
    """The Triton backend's MLA split plan per batch size, as views of one flat scratch no larger than
    ``num_kv_splits`` splits of the largest batch (or one batch of MAX_KV_SPLITS); GQA keeps its fixed count."""
    from radixlm.attention.triton_backend import TritonAttnBackend
    from radixlm.mem import KVCacheSpec

    mla = TritonAttnBackend(16, KVCacheSpec.mla(2, 512, 64, torch.bfloat16), 64, DEVICE, max_context_len=32768,
                            num_sms=132)
    assert mla.mid_lse.numel() == 64 * 16 * 8
    for bs, splits in [(1, MAX_KV_SPLITS), (8, 32), (64, 8)]:
        mid_o, mid_lse = mla.decode_scratch(bs)
        assert mid_o.shape == (bs, 16, splits, 512) and mid_lse.shape == (bs, 16, splits)
        assert mid_o.data_ptr() == mla.mid_o.data_ptr() and mid_o.is_contiguous()
    gqa = TritonAttnBackend(32, KVCacheSpec.mha(2, 8, 128, torch.bfloat16), 64, DEVICE, max_context_len=32768,
                            num_sms=132)
    assert [gqa.decode_scratch(bs)[0].shape[2] for bs in (1, 64)] == [8, 8]
