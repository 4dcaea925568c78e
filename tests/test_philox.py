"""The noise stream: known answers, bit-exactness across backends, quality, keying limits."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import use_backend
from helpers import assert_close
from scipy import stats

from smartgrpo_fast.ops import philox_normal
from smartgrpo_fast.ops.philox import normals_reference, philox4x32_10_reference, philox_bits

# Random123's known-answer vectors for Philox4x32-10: (counter, key, output).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]

#: Max |normal(triton) - normal(reference)| allowed: float32 rounding of log/sqrt/cos/sin.
NORMAL_ATOL = 1e-5


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_known_answers(backend: str, counter, key, expected) -> None:
    words = philox_bits(torch.tensor([counter], dtype=torch.int64), *key)
    assert [int(w) for w in words[0]] == list(expected)


def test_bits_identical_across_backends(run_reference, monkeypatch) -> None:
    gen = torch.Generator().manual_seed(0)
    counters = torch.randint(0, 2**32, (65536, 4), generator=gen, dtype=torch.int64)
    k0, k1 = 0x12345678, 0xFEDCBA98
    ref = run_reference(philox_bits, counters, k0, k1)
    use_backend(monkeypatch, "triton")
    assert torch.equal(philox_bits(counters, k0, k1), ref)


@pytest.mark.parametrize("shape", [(1, 1), (1, 1, 3), (3, 5, 7, 9), (2, 4, 16, 8, 8), (1, 2, 4099)])
def test_normals_triton_vs_reference(backend: str, run_reference, shape) -> None:
    n = philox_normal(shape, seed=2024, round=3)
    ref = run_reference(philox_normal, shape, seed=2024, round=3)
    assert n.shape == shape and n.dtype == torch.float32
    assert_close(n, ref, atol=NORMAL_ATOL, rtol=0, name="n")


def test_normal_max_abs_difference_measured(run_reference, monkeypatch) -> None:
    """The figure quoted in docs/noise-stream.md: max |triton - reference| over 2**20 normals."""
    shape = (4, 16, 16384)
    ref = run_reference(philox_normal, shape, seed=7, round=1)
    use_backend(monkeypatch, "triton")
    tri = philox_normal(shape, seed=7, round=1)
    diff = float((tri - ref).abs().max())
    print(f"max |n_triton - n_reference| over {ref.numel()} normals: {diff:.3g}")
    assert diff <= NORMAL_ATOL


def test_definition_matches_reference_formula() -> None:
    """Element e of slice (b, j) is word e % 4 of Philox((e//4, j, b, round), seed) via
    Box-Muller, recomputed here in float64 from the raw words."""
    seed, rnd, b, j = 0x1_0000_0005, 9, 2, 3
    n = philox_normal((3, 4, 10), seed=seed, round=rnd)[b, j]
    k0, k1 = seed & 0xFFFFFFFF, seed >> 32
    for e in range(10):
        g, w = divmod(e, 4)
        words = philox4x32_10_reference(
            torch.tensor(g), torch.tensor(j), torch.tensor(b), torch.tensor(rnd), k0, k1
        )
        x = [int(t) for t in words]
        first, second = (x[0], x[1]) if w < 2 else (x[2], x[3])
        u1 = ((first >> 8) + 0.5) * 2**-24
        u2 = ((second >> 8) + 0.5) * 2**-24
        r = math.sqrt(-2 * math.log(u1))
        expect = r * (math.cos if w % 2 == 0 else math.sin)(2 * math.pi * u2)
        assert abs(float(n[e]) - expect) < 2e-6, (e, float(n[e]), expect)


def test_same_key_same_bits_and_tensor_seed_agrees(backend: str) -> None:
    a = philox_normal((2, 3, 33), seed=11, round=4)
    b = philox_normal((2, 3, 33), seed=11, round=4)
    c = philox_normal((2, 3, 33), seed=torch.tensor(11), round=torch.tensor(4))
    assert torch.equal(a, b)
    assert torch.equal(a, c)


def test_seed_above_2_63_as_int_and_as_negative_tensor(backend: str) -> None:
    big = 2**63 + 12345
    a = philox_normal((1, 2, 8), seed=big)
    b = philox_normal((1, 2, 8), seed=torch.tensor(big - 2**64))
    assert torch.equal(a, b)
    assert not torch.equal(a, philox_normal((1, 2, 8), seed=12345))


def test_candidates_and_rows_do_not_depend_on_call_size(backend: str) -> None:
    small = philox_normal((2, 3, 5, 7), seed=5, round=2)
    large = philox_normal((4, 8, 5, 7), seed=5, round=2)
    assert torch.equal(small, large[:2, :3])


@pytest.mark.parametrize(
    "other", [{"seed": 6, "round": 2}, {"seed": 5, "round": 3}, {"seed": 5 + 2**32, "round": 2}]
)
def test_different_key_different_noise(other: dict) -> None:
    a = philox_normal((2, 3, 64), seed=5, round=2)
    b = philox_normal((2, 3, 64), **other)
    assert not torch.isclose(a, b).any()


def test_moments_and_kolmogorov_smirnov() -> None:
    n = philox_normal((4, 16, 4096), seed=123, round=0).double().flatten()
    count = n.numel()
    assert abs(float(n.mean())) < 5 / math.sqrt(count)
    assert abs(float(n.var()) - 1) < 5 * math.sqrt(2 / count)
    assert stats.kstest(n.numpy(), "norm").pvalue > 1e-3
    assert float(n.abs().max()) < 5.9  # the 24-bit uniform bounds the tails at 5.887


def _max_abs_corr(x: torch.Tensor, y: torch.Tensor) -> float:
    x = (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True)
    y = (y - y.mean(-1, keepdim=True)) / y.std(-1, keepdim=True)
    return float((x * y).mean(-1).abs().max())


def test_no_correlation_across_candidates_rows_rounds_seeds() -> None:
    d = 16384
    bound = 5 / math.sqrt(d)
    n = philox_normal((3, 4, d), seed=1, round=0).double()
    assert _max_abs_corr(n[:, 0], n[:, 1]) < bound  # across candidates
    assert _max_abs_corr(n[0], n[1]) < bound  # across rows
    n_next = philox_normal((3, 4, d), seed=1, round=1).double()
    assert _max_abs_corr(n, n_next) < bound  # across rounds
    n_seed = philox_normal((3, 4, d), seed=2, round=0).double()
    assert _max_abs_corr(n, n_seed) < bound  # across seeds
    # neighbouring elements: the two Box-Muller outputs of a pair, and across groups
    flat = n.flatten()
    assert _max_abs_corr(flat[0:-1:2], flat[1::2]) < bound
    assert _max_abs_corr(flat[0:-4:4], flat[4::4]) < bound


def test_reference_helper_broadcasts_rows_and_candidates(run_reference) -> None:
    rows = torch.tensor([[1], [0]])
    cands = torch.tensor([[2, 0]])
    got = normals_reference(3, 1, rows, cands, 6)
    full = run_reference(philox_normal, (2, 3, 6), seed=3, round=1)
    assert torch.equal(got[0, 0], full[1, 2])
    assert torch.equal(got[1, 1], full[0, 0])


@pytest.mark.parametrize(
    "shape,match",
    [
        ((2**32, 1), "rows"),
        ((1, 2**32), "k"),
        ((1, 1, 2**17, 2**17 + 1), "2\\*\\*34"),
        ((1,), "at least 2"),
        ((1, 0, 3), ">= 1"),
    ],
)
def test_shape_limits_are_errors(shape, match) -> None:
    with pytest.raises(ValueError, match=match):
        philox_normal(shape, seed=0)


def test_largest_element_count_is_accepted_by_validation() -> None:
    from smartgrpo_fast.ops._common import check_stream_limits

    check_stream_limits(2**32 - 1, 2**32 - 1, 2**34)  # no error at the limit


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"seed": -1}, ValueError, "seed"),
        ({"seed": 2**64}, ValueError, "seed"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"seed": True}, TypeError, "seed"),
        ({"seed": torch.tensor(1, dtype=torch.int32)}, TypeError, "seed"),
        ({"seed": torch.tensor([1])}, TypeError, "seed"),
        ({"seed": 0, "round": -1}, ValueError, "round"),
        ({"seed": 0, "round": 2**32}, ValueError, "round"),
        ({"seed": 0, "round": torch.tensor(2**32)}, ValueError, "round"),
        ({"seed": 0, "round": torch.tensor(1.0)}, TypeError, "round"),
        ({"seed": torch.tensor(1, device="meta"), "device": "cpu"}, ValueError, "seed"),
    ],
)
def test_seed_and_round_validation(kwargs, exc, match) -> None:
    with pytest.raises(exc, match=match):
        philox_normal((1, 1, 4), **kwargs)


# --------------------------------------------------------------------------------------
# row_offset: row b of a call draws the stream's row b + row_offset
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "b,k,s,offset", [(1, 1, (5,), 1), (2, 3, (37,), 3), (3, 2, (4, 7, 9), 2), (2, 2, (4099,), 1)]
)
def test_row_offset_equals_rows_of_the_larger_call(backend: str, b, k, s, offset) -> None:
    big = philox_normal((offset + b, k, *s), seed=31, round=6)
    part = philox_normal((b, k, *s), seed=31, round=6, row_offset=offset)
    assert torch.equal(part, big[offset:])  # bit-exact on the same backend
    as_tensor = philox_normal((b, k, *s), seed=31, round=6, row_offset=torch.tensor(offset))
    assert torch.equal(as_tensor, part)


def test_row_offset_zero_is_the_default_stream(backend: str) -> None:
    a = philox_normal((2, 3, 21), seed=4, round=1)
    assert torch.equal(philox_normal((2, 3, 21), seed=4, round=1, row_offset=0), a)
    assert torch.equal(philox_normal((2, 3, 21), seed=4, round=1, row_offset=torch.tensor(0)), a)


def test_row_offset_at_the_top_of_the_row_word(backend: str) -> None:
    """Rows 2**32 - 2 and 2**32 - 1: the last two row words, against the reference helper."""
    offset = 2**32 - 2
    n = philox_normal((2, 3, 13), seed=8, round=2, row_offset=offset)
    rows = torch.tensor([[offset], [offset + 1]])
    ref = normals_reference(8, 2, rows, torch.arange(3).view(1, 3), 13)
    assert_close(n, ref, atol=NORMAL_ATOL, rtol=0, name="n")
    assert not torch.isclose(n[0], n[1]).any()


@pytest.mark.parametrize(
    "row_offset,exc,match",
    [
        (-1, ValueError, r"^row_offset: expected 0 <= row_offset and row_offset \+ B <= 2\*\*32"),
        (2**32 - 2, ValueError, r"^row_offset: .*B = 3 rows.*got 4294967294"),
        (torch.tensor(2**32), ValueError, r"^row_offset: .*got tensor value 4294967296"),
        (1.0, TypeError, r"^row_offset: expected an int or a 0-d int64 tensor, got float"),
        (True, TypeError, r"^row_offset: expected an int .*got bool"),
        (torch.tensor(1, dtype=torch.int32), TypeError, r"^row_offset: .*torch.int32"),
        (torch.tensor([1]), TypeError, r"^row_offset: .*shape \(1,\)"),
        (torch.tensor(1, device="meta"), ValueError, r"^row_offset: expected a tensor on cpu"),
    ],
)
def test_row_offset_validation(row_offset, exc, match) -> None:
    with pytest.raises(exc, match=match):
        philox_normal((3, 1, 4), seed=0, row_offset=row_offset)


def test_largest_row_offset_is_accepted() -> None:
    philox_normal((3, 1, 4), seed=0, row_offset=2**32 - 3)  # rows up to 2**32 - 1
