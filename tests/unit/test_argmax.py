"""The two-pass row argmax (``radixlm.kernels.argmax``) against ``torch.argmax``, index for index.

Without CUDA the kernels run under the Triton interpreter on CPU tensors.  The cases are the ones where an
argmax can differ: ties within a part and across parts (the first index wins), NaN (larger than everything; the
first NaN wins), +/-inf, -0.0 against +0.0, rows shorter than a part and rows that end inside one."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are decorated

import pytest  # noqa: E402

from radixlm.kernels.argmax import BLOCK, row_argmax, triton_argmax  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def check(x: torch.Tensor) -> None:
    x = x.to(DEVICE)
    got = triton_argmax(x)
    assert got.dtype == torch.int64 and got.shape == (x.shape[0],)
    assert got.tolist() == x.argmax(dim=-1).tolist(), x


@pytest.mark.parametrize("n", [1, 7, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5, 49152])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_random_rows(n: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(n)
    check(torch.randn(3, n, generator=g).to(dtype))


def test_ties_resolve_to_the_first_index() -> None:
    n = 3 * BLOCK + 17
    x = torch.zeros(6, n)
    x[0, [5, 9]] = 1.0  # within a part
    x[1, [BLOCK + 3, 2 * BLOCK + 1, n - 1]] = 2.0  # across parts
    x[2, [n - 1, BLOCK - 1]] = 3.0
    x[3] = 7.0  # the whole row
    x[4] = -float("inf")  # every value -inf: index 0
    x[5, [2 * BLOCK, 10]] = float("inf")
    check(x)


def test_nan_is_the_largest_and_the_first_nan_wins() -> None:
    n = 2 * BLOCK + 3
    x = torch.randn(4, n, generator=torch.Generator().manual_seed(1))
    x[0, 77] = float("nan")
    x[0, 5] = float("inf")
    x[1, [BLOCK + 2, 2 * BLOCK]] = float("nan")
    x[2, [2 * BLOCK + 2, 3]] = -float("nan")  # a NaN with the sign bit set counts as NaN too
    x[3, :] = float("nan")
    check(x)


def test_negative_zero_equals_positive_zero() -> None:
    x = torch.full((3, BLOCK + 9), -1.0)
    x[0, [4, 8]] = torch.tensor([-0.0, 0.0])
    x[1, [4, BLOCK + 1]] = torch.tensor([0.0, -0.0])
    x[2, [BLOCK + 1, 6]] = torch.tensor([-0.0, -0.0])
    check(x)


def test_strided_rows_and_many_rows() -> None:
    wide = torch.randn(40, 2 * BLOCK + 100, generator=torch.Generator().manual_seed(2))
    check(wide[:, : BLOCK + 50])  # rows a view of wider ones
    check(torch.randn(0, 10))


def test_refusals_and_the_dispatcher() -> None:
    with pytest.raises(ValueError, match="unit stride"):
        triton_argmax(torch.randn(4, 3).t())
    with pytest.raises(ValueError, match="empty"):
        triton_argmax(torch.randn(2, 0))
    x = torch.randn(2, 5, dtype=torch.float64)
    assert row_argmax(x).tolist() == x.argmax(dim=-1).tolist()  # float64 (and CPU tensors): torch's own
