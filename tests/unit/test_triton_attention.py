"""The Triton attention kernels against an independent float64 reference, and the Triton backend against the
torch-native one through the scheduler.

Without a GPU the kernels run under Triton's interpreter, which is slow: shapes stay small there.  With one,
the same tests run compiled on the GPU, plus bf16 and longer contexts.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported: decoration picks the mode

import pytest

from radixlm.config import ServerArgs
from radixlm.core import Req
from radixlm.executor import ModelRunner, ModelWorker
from radixlm.kernels.decode_attention import decode_attention_fwd
from radixlm.kernels.extend_attention import extend_attention_fwd
from radixlm.models.loader import resolve_model_config
from radixlm.sampling import SamplingParams
from radixlm.scheduler import Scheduler, run_to_completion
from conftest import build_tiny_hf_model

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# The interpreter's tl.dot returns garbage for bf16 operands (triton 3.9), so bf16 is checked on GPU only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}
HEADS = [(4, 4, 64), (9, 3, 96), (8, 2, 128)]  # (num_heads, num_kv_heads, head_dim): GQA groups 1, 3, 4


def kv_layout(seq_lens: list[int], page_size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A req_to_token table whose requests sit in random rows and own randomly scattered pages of ``page_size``
    consecutive slots (page 0 stays padding, as in the pool).  Returns (table, req_pool_indices, num_slots)."""
    pages = [-(-n // page_size) for n in seq_lens]
    num_pages = sum(pages) + 4  # spare pages: the pool is not exactly full
    page_ids = torch.randperm(num_pages - 1, generator=gen) + 1
    num_rows = len(seq_lens) + 3
    rows = torch.randperm(num_rows, generator=gen)[: len(seq_lens)]
    table = torch.zeros((num_rows, max(seq_lens) + 3), dtype=torch.int32)  # rows end in unused columns
    used = 0
    for row, n, p in zip(rows.tolist(), seq_lens, pages):
        pos = torch.arange(n)
        table[row, :n] = (page_ids[used + pos // page_size] * page_size + pos % page_size).int()
        used += p
    return table.to(DEVICE), rows.to(DEVICE), num_pages * page_size


def random_kv(num_slots: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
              gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (num_slots, num_kv_heads, head_dim)
    return (torch.randn(shape, generator=gen).to(DEVICE, dtype), torch.randn(shape, generator=gen).to(DEVICE, dtype))


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, sm_scale: float,
              window: int | None) -> torch.Tensor:
    """float64 softmax(q K^T) V of one request: q [n, heads, d] at positions q_pos [n]; K/V [seq, kv_heads, d]
    hold its keys by position.  Causal, and within ``window`` of the query when given."""
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = torch.einsum("nhd,shd->hns", q.double(), k) * sm_scale
    key_pos = torch.arange(k.shape[0], device=q.device)
    allowed = key_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= key_pos[None, :] > q_pos[:, None] - window
    return torch.einsum("hns,shd->nhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def run_decode(seq_lens: list[int], heads: tuple[int, int, int], dtype: torch.dtype, page_size: int,
               window: int | None, num_kv_splits: int = 8) -> None:
    num_heads, num_kv_heads, head_dim = heads
    gen = torch.Generator().manual_seed(hash((tuple(seq_lens), heads, page_size, window)) % 2**31)
    table, rows, num_slots = kv_layout(seq_lens, page_size, gen)
    k_buf, v_buf = random_kv(num_slots, num_kv_heads, head_dim, dtype, gen)
    bs = len(seq_lens)
    q = torch.randn((bs, num_heads, head_dim), generator=gen).to(DEVICE, dtype)
    o = torch.full_like(q, float("nan"))
    # Scratch for a larger batch, sliced as the backend does, and poisoned: empty splits must not leak NaN.
    mid_o = torch.full((bs + 2, num_heads, num_kv_splits, head_dim), float("nan"), device=DEVICE)
    mid_lse = torch.full((bs + 2, num_heads, num_kv_splits), float("nan"), device=DEVICE)
    sm_scale = head_dim**-0.5
    decode_attention_fwd(q, k_buf, v_buf, o, table, rows, torch.tensor(seq_lens, device=DEVICE), mid_o[:bs],
                         mid_lse[:bs], sm_scale, window)
    assert o.dtype == dtype and not o.isnan().any()
    for i, n in enumerate(seq_lens):
        slots = table[rows[i], :n].long()
        ref = reference(q[i : i + 1], k_buf[slots], v_buf[slots], torch.tensor([n - 1], device=DEVICE), sm_scale,
                        window)
        assert rel_err(o[i : i + 1], ref) < TOLERANCE[dtype], f"request {i} (seq_len {n})"


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("window", [None, 5])
def test_decode(heads: tuple[int, int, int], dtype: torch.dtype, page_size: int, window: int | None) -> None:
    # 1: a single key; 17: all splits but one empty; 64: exactly one key block; 70: two blocks, the last partial.
    # Four splits keep the interpreter's grid small; other split counts are covered below.
    run_decode([1, 17, 64, 70], heads, dtype, page_size, window, num_kv_splits=4)


@pytest.mark.parametrize("num_kv_splits", [1, 3, 8])
def test_decode_long_context_splits(num_kv_splits: int) -> None:
    # Long enough that several splits hold several key blocks each (3 splits: a non-power-of-two merge).
    seq_lens = [1000, 333, 2] if not CUDA else [6000, 4097, 333, 2]
    run_decode(seq_lens, (8, 2, 128), torch.float16, 16, None, num_kv_splits)
    run_decode(seq_lens, (8, 2, 128), torch.float32, 1, 300, num_kv_splits)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32] + ([torch.bfloat16] if CUDA else []))
@pytest.mark.parametrize("head_dim,group", [(64, 64), (128, 32)])
def test_decode_writes_group_quantized_output(dtype: torch.dtype, head_dim: int, group: int) -> None:
    """With ``o_scale`` the merge writes the output in E4M3 per token per ``group`` channels: the bits of writing
    it in q's dtype and then running the group quantizer over it (``fp8_gemm``), one launch fewer."""
    from radixlm.kernels.fp8 import FP8_DTYPE
    from radixlm.kernels.fp8_gemm import per_token_group_quant_fp8_triton

    seq_lens, (num_heads, num_kv_heads) = [1, 40, 70], (4, 2)
    gen = torch.Generator().manual_seed(head_dim + group)
    table, rows, num_slots = kv_layout(seq_lens, 16, gen)
    k_buf, v_buf = random_kv(num_slots, num_kv_heads, head_dim, dtype, gen)
    bs = len(seq_lens)
    q = torch.randn((bs, num_heads, head_dim), generator=gen).to(DEVICE, dtype)
    mid_o = torch.empty((bs, num_heads, 4, head_dim), device=DEVICE)
    mid_lse = torch.empty((bs, num_heads, 4), device=DEVICE)
    args = (table, rows, torch.tensor(seq_lens, device=DEVICE), mid_o, mid_lse, head_dim**-0.5)
    o = torch.empty_like(q)
    decode_attention_fwd(q, k_buf, v_buf, o, *args)
    want_q, want_s = per_token_group_quant_fp8_triton(o.view(bs, -1), group)
    o_q = torch.empty((bs, num_heads, head_dim), dtype=FP8_DTYPE, device=DEVICE)
    o_s = torch.full((bs, num_heads * head_dim // group), float("nan"), device=DEVICE)
    decode_attention_fwd(q, k_buf, v_buf, o_q, *args, o_scale=o_s)
    assert torch.equal(o_s, want_s)
    assert torch.equal(o_q.view(bs, -1).view(torch.uint8), want_q.view(torch.uint8))


def run_extend(reqs: list[tuple[int, int]], heads: tuple[int, int, int], dtype: torch.dtype, page_size: int,
               window: int | None) -> None:
    """``reqs``: (prefix_len, extend_len) of each request."""
    num_heads, num_kv_heads, head_dim = heads
    gen = torch.Generator().manual_seed(hash((tuple(reqs), heads, page_size, window)) % 2**31)
    table, rows, num_slots = kv_layout([p + e for p, e in reqs], page_size, gen)
    k_buf, v_buf = random_kv(num_slots, num_kv_heads, head_dim, dtype, gen)
    prefix_lens = torch.tensor([p for p, _ in reqs], device=DEVICE)
    extend_lens = torch.tensor([e for _, e in reqs], device=DEVICE)
    starts = torch.cumsum(extend_lens, 0) - extend_lens
    q = torch.randn((int(extend_lens.sum()), num_heads, head_dim), generator=gen).to(DEVICE, dtype)
    o = torch.full_like(q, float("nan"))
    sm_scale = head_dim**-0.5
    extend_attention_fwd(q, k_buf, v_buf, o, table, rows, prefix_lens, extend_lens, starts,
                         max(e for _, e in reqs), sm_scale, window)
    assert o.dtype == dtype and not o.isnan().any()
    for i, (prefix, ext) in enumerate(reqs):
        slots = table[rows[i], : prefix + ext].long()
        start = int(starts[i])
        q_pos = torch.arange(prefix, prefix + ext, device=DEVICE)
        ref = reference(q[start : start + ext], k_buf[slots], v_buf[slots], q_pos, sm_scale, window)
        assert rel_err(o[start : start + ext], ref) < TOLERANCE[dtype], f"request {i} (prefix {prefix}, new {ext})"


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("window", [None, 7])
def test_extend(heads: tuple[int, int, int], dtype: torch.dtype, page_size: int, window: int | None) -> None:
    # no prefix with two query blocks; prefix with a partial block; one new token; a prefix of whole blocks
    run_extend([(0, 70), (20, 45), (5, 1), (64, 6)], heads, dtype, page_size, window)


@pytest.mark.parametrize("head_dim", [80, 256])
def test_head_dims_padded_and_large(head_dim: int) -> None:
    # 80 pads to a 128-wide block; 256 takes the large-tile launch configurations
    run_decode([1, 40, 70], (4, 2, head_dim), torch.float16, 16, None)
    run_extend([(0, 40), (30, 9)], (4, 2, head_dim), torch.float16, 1, None)


@pytest.mark.skipif(not CUDA, reason="prefill-sized shapes are too slow for the interpreter")
def test_extend_long_chunks() -> None:
    # 2048 new tokens select the 128-row query blocks
    run_extend([(0, 2048), (3000, 517), (4096, 1)], (32, 8, 128), torch.bfloat16, 16, None)
    run_extend([(0, 2048), (3000, 517), (4096, 1)], (32, 8, 128), torch.float32, 1, 700)


# ---------------------------------------------------------------- through the scheduler


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    paths = {}
    for name in ("llama", "mistral_sliding"):
        path = tmp_path_factory.mktemp(name)
        build_tiny_hf_model(name, str(path))
        paths[name] = str(path)
    return paths


def greedy_outputs(model_path: str, backend: str, page_size: int) -> tuple[list[list[int]], list[int]]:
    """Output ids and cached prompt tokens of a first request, then three sharing its first 24 tokens."""
    args = ServerArgs(model_path=model_path, device=DEVICE, random_seed=0, max_total_tokens=1024,
                      page_size=page_size, attention_backend=backend)
    sched = Scheduler(args, ModelWorker(ModelRunner(args, resolve_model_config(args))))
    shared = list(range(100, 124))
    prompts = [shared + [7, 8, 9], shared + [11] * 5, shared + [300, 301], shared[:20] + [42]]
    reqs = []
    for i, ids in enumerate(prompts):
        sp = SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True)
        sp.normalize()
        reqs.append(Req(rid=str(i), origin_input_ids=ids, sampling_params=sp))
    run_to_completion(sched, reqs[:1])  # cached, so the others extend after a prefix
    run_to_completion(sched, reqs[1:])
    return [r.output_ids for r in reqs], [r.cached_tokens for r in reqs]


@pytest.mark.parametrize("model,page_size", [("llama", 1), ("llama", 16), ("mistral_sliding", 1)])
def test_scheduler_matches_torch_native(tiny_models: dict[str, str], model: str, page_size: int) -> None:
    outs, cached = greedy_outputs(tiny_models[model], "triton", page_size)
    assert cached[1] > 0  # the prefix path of the extend kernel ran
    assert (outs, cached) == greedy_outputs(tiny_models[model], "torch_native", page_size)
