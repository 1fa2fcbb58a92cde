"""``GemmConfig``: the launch parameters of radixlm's Triton GEMMs (the fused-MoE grouped GEMM, the block-FP8 GEMM)."""

from __future__ import annotations

from typing import NamedTuple


class GemmConfig(NamedTuple):
    """Tile sizes, warps and pipeline stages of one GEMM launch.  ``group_m`` M blocks share a run of N blocks in
    the launch order (weight-tile reuse in L2).  Each kernel states its own constraints (the MoE GEMM aligns
    expert runs to ``block_m``; an FP8 ``tl.dot`` needs ``block_k >= 32`` on a GPU)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
