"""``radixlm.kernels.fused_moe``: the expert alignment, the Triton grouped GEMM and the grouped torch path, each
against a dense per-token reference in float64.

Without CUDA the Triton path runs under the interpreter on CPU tensors (called directly: the dispatcher sends CPU
tensors to torch).  The interpreter's tl.dot returns garbage for bf16 operands, so bf16 is checked on GPU only.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported: decoration picks the mode

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from radixlm.kernels.fused_moe import fused_experts, fused_experts_torch  # noqa: E402
from radixlm.kernels.moe_align import align_pairs_torch, align_pairs_triton, max_padded_pairs  # noqa: E402
from radixlm.kernels.moe_gemm import GemmConfig, default_config, fused_experts_triton  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
# Relative Frobenius error vs the float64 reference: fp32 is exact up to summation order; fp16/bf16 round the
# activation and each expert's output once.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
# Small tiles, so the interpreter's shapes span several M, N and K blocks (with ragged edges) per expert.
SMALL = GemmConfig(block_m=16, block_n=16, block_k=16, group_m=2)


def make_case(num_tokens: int, num_experts: int, hidden: int, inter: int, top_k: int, dtype: torch.dtype,
              seed: int = 0, id_dtype: torch.dtype = torch.int64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)]) \
        if num_tokens else torch.zeros(0, top_k, dtype=torch.int64)
    weights = torch.rand(num_tokens, top_k, generator=gen)
    return x.to(dtype), w13.to(dtype), w2.to(dtype), weights, ids.to(id_dtype)


def dense_reference(x, w13, w2, weights, ids) -> torch.Tensor:
    """The definition, one (token, k) at a time, in float64."""
    inter = w13.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            gate_up = w13[e].double() @ x[t].double()
            act = F.silu(gate_up[:inter]) * gate_up[inter:]
            out[t] += float(weights[t, k]) * (w2[e].double() @ act)
    return out


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.cpu().double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("num_tokens,num_experts,hidden,inter,top_k", [
    (1, 4, 32, 16, 1),
    (5, 4, 48, 24, 2),  # hidden and inter not multiples of the K block
    (33, 8, 64, 48, 3),  # several M blocks per expert
    (33, 8, 40, 16, 1),  # top_k 1: the down GEMM writes the output rows directly
    (2, 8, 32, 16, 3),  # most experts receive no token
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_matches_dense_reference(num_tokens, num_experts, hidden, inter, top_k, dtype) -> None:
    x, w13, w2, weights, ids = make_case(num_tokens, num_experts, hidden, inter, top_k, dtype)
    expected = dense_reference(x, w13, w2, weights, ids)
    args = [t.to(DEVICE) for t in (x, w13, w2, weights, ids)]
    for config in (SMALL, None):  # small tiles, and the default heuristic's
        out = fused_experts_triton(*args, config=config)
        assert out.shape == x.shape and out.dtype == dtype
        assert rel_err(out, expected) < TOLERANCE[dtype], config


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_triton_id_dtypes_and_no_tokens(id_dtype) -> None:
    x, w13, w2, weights, ids = make_case(7, 6, 32, 24, 2, torch.float32, seed=1, id_dtype=id_dtype)
    out = fused_experts_triton(*(t.to(DEVICE) for t in (x, w13, w2, weights, ids)), config=SMALL)
    assert rel_err(out, dense_reference(x, w13, w2, weights, ids)) < TOLERANCE[torch.float32]
    empty = make_case(0, 6, 32, 24, 2, torch.float16, id_dtype=id_dtype)
    out = fused_experts_triton(*(t.to(DEVICE) for t in empty))
    assert out.shape == (0, 32) and out.dtype == torch.float16


@pytest.mark.parametrize("num_tokens,num_experts,top_k", [
    (0, 4, 2), (1, 4, 1), (5, 8, 3), (33, 6, 2), (2, 64, 6), (40, 5, 3),  # 120 pairs: several kernel chunks
])
@pytest.mark.parametrize("block_m", [1, 4, 16])
@pytest.mark.parametrize("align", [align_pairs_torch, align_pairs_triton])
def test_alignment_against_brute_force(num_tokens, num_experts, top_k, block_m, align) -> None:
    id_dtype = torch.int32 if block_m == 4 else torch.int64
    ids = make_case(num_tokens, num_experts, 8, 8, top_k, torch.float32, seed=2, id_dtype=id_dtype)[4]
    num_pairs = num_tokens * top_k
    sorted_pair_ids, block_expert_ids, num_padded = align(ids.to(DEVICE), num_experts, block_m)
    max_padded = max_padded_pairs(num_pairs, num_experts, block_m)
    assert sorted_pair_ids.shape == (max_padded,) and block_expert_ids.shape == (max_padded // block_m,)
    assert sorted_pair_ids.dtype == block_expert_ids.dtype == torch.int32

    # Expected: for each expert in increasing order, its pairs in increasing order, padded to a block multiple.
    flat = ids.reshape(-1).tolist()
    expected_slots, expected_blocks = [], []
    for e in range(num_experts):
        pairs = [p for p in range(num_pairs) if flat[p] == e]
        if pairs:
            blocks = -(-len(pairs) // block_m)
            expected_slots += pairs + [num_pairs] * (blocks * block_m - len(pairs))
            expected_blocks += [e] * blocks
    used = len(expected_slots)
    assert num_padded.tolist() == [used]
    assert sorted_pair_ids[:used].tolist() == expected_slots
    assert (sorted_pair_ids[used:] == num_pairs).all()
    assert block_expert_ids[:len(expected_blocks)].tolist() == expected_blocks
    assert (block_expert_ids[len(expected_blocks):] == num_experts).all()
    # the properties the GEMM relies on, stated directly
    real = sorted_pair_ids[:used][sorted_pair_ids[:used] < num_pairs]
    assert sorted(real.tolist()) == list(range(num_pairs))  # every pair exactly once
    for b in range(used // block_m):
        block = sorted_pair_ids[b * block_m:(b + 1) * block_m]
        assert all(flat[p] == block_expert_ids[b] for p in block.tolist() if p < num_pairs)


@pytest.mark.parametrize("num_tokens,num_experts,hidden,inter,top_k", [(0, 4, 32, 16, 2), (1, 4, 32, 16, 1),
                                                                       (5, 8, 48, 24, 3), (33, 6, 64, 40, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_matches_dense_reference(num_tokens, num_experts, hidden, inter, top_k, dtype) -> None:
    x, w13, w2, weights, ids = make_case(num_tokens, num_experts, hidden, inter, top_k, dtype, seed=3)
    out = fused_experts(x, w13, w2, weights, ids)  # CPU tensors: the torch path
    assert out.shape == x.shape and out.dtype == dtype
    if num_tokens:
        assert rel_err(out, dense_reference(x, w13, w2, weights, ids)) < TOLERANCE[dtype]
        assert torch.equal(out, fused_experts_torch(x, w13, w2, weights, ids.int()))


def test_default_config_grows_with_pairs_per_expert() -> None:
    decode, prefill = default_config(8, 256), default_config(4096 * 8, 256)
    assert decode.block_m == 16 and prefill.block_m > decode.block_m


@pytest.mark.skipif(not CUDA, reason="real shapes are too slow for the interpreter")
@pytest.mark.parametrize("num_tokens", [1, 64, 1024])
def test_triton_real_shapes_on_gpu(num_tokens) -> None:
    # Qwen3-30B-A3B's layer shape; the grouped torch path in bf16 is the reference.
    case = make_case(num_tokens, 128, 2048, 768, 8, torch.bfloat16, seed=4)
    args = [t.cuda() for t in case]
    expected = fused_experts_torch(*args).double()
    out = fused_experts(*args)
    assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-2


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("num_tokens", [3, 1000])  # the Triton alignment kernel, and the torch one
def test_triton_path_replays_in_a_cuda_graph(num_tokens) -> None:
    """Captured once, replayed with a new routing written into the same input buffers: nothing in the path may
    read the routing on the host (a host read would fail the capture or freeze the first routing)."""
    x, w13, w2, weights, ids = (t.cuda() for t in make_case(num_tokens, 64, 128, 96, 6, torch.bfloat16, seed=5))
    fused_experts(x, w13, w2, weights, ids)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_experts(x, w13, w2, weights, ids)
    new_weights, new_ids = (t.cuda() for t in make_case(num_tokens, 64, 128, 96, 6, torch.bfloat16, seed=6)[3:])
    weights.copy_(new_weights)
    ids.copy_(new_ids)
    graph.replay()
    torch.testing.assert_close(out, fused_experts(x, w13, w2, weights, ids), rtol=0, atol=0)
