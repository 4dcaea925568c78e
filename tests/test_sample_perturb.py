"""sample_perturb against its reference and its definition, over shapes, dtypes and forms."""

from __future__ import annotations

import pytest
import torch
from conftest import use_backend
from helpers import assert_close

from smartgrpo_fast.ops import philox_normal, sample_perturb

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 4), (3, 5, 7, 9), (2, 16, 8, 8), (1, 1), (5, 3)]


def _definition(mean, mu, sigma, scale, *, k, seed, rnd):
    """z from philox_normal and plain broadcasting, float32."""
    b = mean.shape[0]
    n = philox_normal((b, k, *mean.shape[1:]), seed=seed, round=rnd)
    view = (b, 1) + (1,) * (mean.dim() - 1)

    def per_row_or_elem(x):
        if not isinstance(x, torch.Tensor):
            return torch.tensor(float(x))
        x = x.float()
        if x.dim() == 1 and x.shape[0] == b:
            return x.view(view)
        return x.expand(mean.shape).unsqueeze(1)

    return mean.float().unsqueeze(1) + per_row_or_elem(scale) * (
        per_row_or_elem(mu) + per_row_or_elem(sigma) * n
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 3, 8])
def test_matches_reference(backend, run_reference, shape, dtype, k) -> None:
    gen = torch.Generator().manual_seed(hash((shape, k)) % 2**31)
    mean = torch.randn(shape, generator=gen).to(dtype)
    mu = 0.1 * torch.randn(shape, generator=gen)
    sigma = torch.rand(shape[0], generator=gen) + 0.5
    scale = torch.rand(shape[0], generator=gen)
    z = sample_perturb(mean, mu, sigma, scale, k=k, seed=99, round=1)
    ref = run_reference(sample_perturb, mean, mu, sigma, scale, k=k, seed=99, round=1)
    assert z.shape == (shape[0], k, *shape[1:]) and z.dtype == dtype
    assert_close(z, ref, name="z")


MU_FORMS = {
    "float": lambda b, s: 0.25,
    "0d": lambda b, s: torch.tensor(-0.5),
    "row": lambda b, s: torch.linspace(-1, 1, b),
    "elem": lambda b, s: torch.linspace(-1, 1, b * s.numel()).reshape(b, *s),
    "bcast": lambda b, s: torch.linspace(0, 1, s[-1]),  # broadcasts along the last axis
}
SIGMA_FORMS = {
    "float": lambda b, s: 0.7,
    "row": lambda b, s: torch.linspace(0.1, 2, b),
    "elem": lambda b, s: torch.linspace(0, 2, b * s.numel()).reshape(b, *s),
}
SCALE_FORMS = {
    "float": lambda b, s: 0.3,
    "0d": lambda b, s: torch.tensor(1.5),
    "row": lambda b, s: torch.linspace(0.5, 1, b),
}


@pytest.mark.parametrize("mu_form", list(MU_FORMS))
@pytest.mark.parametrize("sigma_form", list(SIGMA_FORMS))
@pytest.mark.parametrize("scale_form", list(SCALE_FORMS))
def test_parameter_forms_match_definition(backend, mu_form, sigma_form, scale_form) -> None:
    b, s = 3, torch.Size((2, 5, 6))
    mean = torch.randn(b, *s, generator=torch.Generator().manual_seed(1))
    mu, sigma = MU_FORMS[mu_form](b, s), SIGMA_FORMS[sigma_form](b, s)
    scale = SCALE_FORMS[scale_form](b, s)
    z = sample_perturb(mean, mu, sigma, scale, k=4, seed=3, round=7)
    expected = _definition(mean, mu, sigma, scale, k=4, seed=3, rnd=7)
    assert_close(z, expected, atol=1e-5, rtol=1e-5, name="z")


def test_zero_mean_unit_sigma_gives_the_stream(backend) -> None:
    mean = torch.zeros(2, 3, 11)
    z = sample_perturb(mean, 0.0, 1.0, 1.0, k=5, seed=42, round=3)
    assert torch.equal(z, philox_normal((2, 5, 3, 11), seed=42, round=3))


def test_non_contiguous_and_broadcast_inputs(backend, run_reference) -> None:
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(4, 6, 10, generator=gen)
    mean_t = base.transpose(1, 2)  # (4, 10, 6), non-contiguous
    mean_s = base[::2]  # row-strided slice (2, 6, 10)
    mean_e = torch.randn(1, 6, 10, generator=gen).expand(3, 6, 10)  # stride-0 rows
    mu_t = torch.randn(4, 6, 10, generator=gen).transpose(1, 2)
    sigma_s = torch.rand(8, generator=gen)[::2] + 0.1  # strided (4,)
    for mean, mu, sigma in (
        (mean_t, mu_t, sigma_s),
        (mean_s, 0.1, 1.0),
        (mean_e, 0.0, torch.tensor([0.5, 1.0, 2.0])),
    ):
        z = sample_perturb(mean, mu, sigma, 0.8, k=3, seed=5, round=0)
        ref = run_reference(sample_perturb, mean.contiguous(), mu, sigma, 0.8, k=3, seed=5)
        assert_close(z, ref, name="z")
        expected = _definition(mean, mu, sigma, 0.8, k=3, seed=5, rnd=0)
        assert_close(z, expected, atol=1e-5, rtol=1e-5, name="z vs definition")


def test_tensor_seed_and_round_agree_with_ints_and_are_read_at_call_time(backend) -> None:
    mean = torch.randn(2, 9)
    seed, rnd = torch.tensor(17), torch.tensor(0)
    first = sample_perturb(mean, 0.0, 1.0, 1.0, k=2, seed=seed, round=rnd)
    assert torch.equal(first, sample_perturb(mean, 0.0, 1.0, 1.0, k=2, seed=17, round=0))
    rnd.add_(1)  # what a captured graph's round counter does between replays
    second = sample_perturb(mean, 0.0, 1.0, 1.0, k=2, seed=seed, round=rnd)
    assert torch.equal(second, sample_perturb(mean, 0.0, 1.0, 1.0, k=2, seed=17, round=1))
    assert not torch.equal(first, second)


def test_more_candidates_keep_the_first_ones(backend) -> None:
    mean = torch.randn(2, 4, 4)
    z3 = sample_perturb(mean, 0.0, 1.0, 0.5, k=3, seed=8)
    z7 = sample_perturb(mean, 0.0, 1.0, 0.5, k=7, seed=8)
    assert torch.equal(z3, z7[:, :3])


def test_many_candidates_split_across_programs(monkeypatch, run_reference) -> None:
    """K large enough that the launcher splits candidates into chunks (GPU block sizes)."""
    from smartgrpo_fast.ops.sample_perturb import _candidates_per_program

    assert _candidates_per_program(1, 64) < 64
    use_backend(monkeypatch, "triton")
    mean = torch.randn(1, 40)
    z = sample_perturb(mean, 0.0, 1.0, 1.0, k=33, seed=1)
    ref = run_reference(sample_perturb, mean, 0.0, 1.0, 1.0, k=33, seed=1)
    assert_close(z, ref, name="z")


def test_sigma_zero_returns_mean_plus_scaled_mu(backend) -> None:
    mean = torch.randn(2, 3, 4)
    z = sample_perturb(mean, 0.5, 0.0, 2.0, k=3, seed=0)
    assert_close(z, (mean + 1.0).unsqueeze(1).expand(2, 3, 3, 4), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "b,k,s,offset", [(1, 1, (5,), 2), (2, 3, (3, 13), 3), (3, 4, (2, 4, 4), 1), (2, 2, (1027,), 1)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_offset_equals_rows_of_the_larger_call(backend, b, k, s, offset, dtype) -> None:
    """A call on rows [o, o + B) of a batch with row_offset=o draws exactly those rows' noise."""
    gen = torch.Generator().manual_seed(3)
    n_rows = offset + b
    mean = torch.randn(n_rows, *s, generator=gen).to(dtype)
    mu = 0.1 * torch.randn(n_rows, *s, generator=gen)  # per element
    sigma = torch.rand(n_rows, generator=gen) + 0.5  # per row
    kw = dict(k=k, seed=2**40 + 3, round=4)
    big = sample_perturb(mean, mu, sigma, 0.7, **kw)
    rows = slice(offset, n_rows)
    part = sample_perturb(mean[rows], mu[rows], sigma[rows], 0.7, row_offset=offset, **kw)
    assert torch.equal(part, big[rows])  # bit-exact on the same backend
    part_t = sample_perturb(
        mean[rows], mu[rows], sigma[rows], 0.7, row_offset=torch.tensor(offset), **kw
    )
    assert torch.equal(part_t, part)


def test_row_offset_is_read_at_call_time_and_defaults_to_zero(backend) -> None:
    mean = torch.zeros(1, 10)
    offset = torch.tensor(0)
    first = sample_perturb(mean, 0.0, 1.0, 1.0, k=2, seed=6, row_offset=offset)
    assert torch.equal(first, sample_perturb(mean, 0.0, 1.0, 1.0, k=2, seed=6))
    offset.add_(2)  # an in-place change, as a captured graph would see it
    second = sample_perturb(mean, 0.0, 1.0, 1.0, k=2, seed=6, row_offset=offset)
    assert torch.equal(second, philox_normal((3, 2, 10), seed=6)[2:])
