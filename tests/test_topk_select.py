"""topk_select: highest first, NaN last, ties to the lower index, on every backend."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from smartgrpo_fast.ops import topk_select, topk_select_reference


def _oracle(row: list[float], t: int) -> list[int]:
    """Independent definition: sort key (is NaN, -value, index)."""

    def key(i: int) -> tuple[bool, float, int]:
        x = row[i]
        return (math.isnan(x), 0.0 if math.isnan(x) else -x, i)

    return sorted(range(len(row)), key=key)[:t]


def _check(rewards: torch.Tensor, t: int) -> None:
    idx = topk_select(rewards, t)
    assert idx.dtype == torch.int64 and idx.shape == (rewards.shape[0], t)
    ranked = rewards.float() if rewards.dtype != torch.float64 else rewards
    for b in range(rewards.shape[0]):
        assert idx[b].tolist() == _oracle(ranked[b].tolist(), t), f"row {b}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("b,k,t", [(1, 1, 1), (3, 8, 8), (4, 17, 5), (2, 64, 1), (5, 100, 16)])
def test_matches_oracle(backend, dtype, b, k, t) -> None:
    gen = torch.Generator().manual_seed(k * 31 + t)
    r = torch.randn(b, k, generator=gen).to(dtype)
    r[:, ::7] = float("nan")
    r[:, 1::5] = r[:, :1]  # ties with the first column
    if k > 3:
        r[0, 2], r[0, 3] = 0.0, -0.0  # signed zeros tie
        r[-1, 1], r[-1, 2] = float("inf"), float("-inf")
    _check(r, t)


def test_nan_ranks_below_minus_inf(backend) -> None:
    r = torch.tensor([[float("nan"), float("-inf"), float("nan"), -1e30]])
    assert topk_select(r, 4).tolist() == [[3, 1, 0, 2]]


def test_all_nan_row_keeps_index_order(backend) -> None:
    r = torch.full((2, 6), float("nan"))
    assert topk_select(r, 6).tolist() == [list(range(6))] * 2


def test_all_equal_row_takes_lowest_indices(backend) -> None:
    assert topk_select(torch.zeros(1, 9), 4).tolist() == [[0, 1, 2, 3]]


def test_non_contiguous_rewards(backend) -> None:
    r = torch.randn(12, 5).t()  # (5, 12) with column-major strides
    _check(r, 6)


def test_large_k(backend) -> None:
    r = torch.randn(2, 3000, generator=torch.Generator().manual_seed(9))
    r[0, 100] = float("nan")
    _check(r, 40)


def test_many_rows_match_the_reference(backend) -> None:
    """600 rows of 64: the C++ op splits them over threads (at least 256 rows a task)."""
    r = torch.randn(600, 64, generator=torch.Generator().manual_seed(5))
    r[::3, ::5] = float("nan")
    r[1::3, 1::4] = r[1::3, :1]  # ties
    assert torch.equal(topk_select(r, 10), topk_select_reference(r, 10))


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.floats(allow_nan=True, allow_infinity=True, width=32),
            st.sampled_from([0.0, -0.0, 1.0, float("nan")]),
        ),
        min_size=1,
        max_size=40,
    ),
    st.integers(min_value=1, max_value=40),
)
def test_reference_property(values: list[float], t: int) -> None:
    t = min(t, len(values))
    r = torch.tensor([values], dtype=torch.float32)
    assert topk_select_reference(r, t)[0].tolist() == _oracle(values, t)
