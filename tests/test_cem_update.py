"""cem_update: elite statistics regenerated from Philox, against reference and sample_perturb."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from smartgrpo_fast.ops import cem_update, philox_normal, sample_perturb, topk_select

SHAPES = [(1, 4), (3, 5, 7, 9), (2, 16, 8, 8), (2, 1)]


def _elites(b: int, k: int, t: int, seed: int) -> torch.Tensor:
    scores = torch.randn(b, k, generator=torch.Generator().manual_seed(seed))
    return topk_select(scores, t)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k,t", [(1, 1), (6, 6), (8, 3), (16, 1)])
@pytest.mark.parametrize("per_element", [True, False])
def test_matches_reference(backend, run_reference, shape, k, t, per_element) -> None:
    b = shape[0]
    gen = torch.Generator().manual_seed(4)
    mu = 0.2 * torch.randn(shape, generator=gen)
    sigma = torch.rand(shape if per_element else (b,), generator=gen) + 0.5
    idx = run_reference(_elites, b, k, t, 1)
    kw = dict(shape=shape, k=k, seed=10, round=2, alpha=0.7, min_sigma=0.05)
    mu_new, sigma_new = cem_update(mu, sigma, idx, per_element=per_element, **kw)
    ref_mu, ref_sigma = run_reference(cem_update, mu, sigma, idx, per_element=per_element, **kw)
    assert mu_new.shape == shape and mu_new.dtype == torch.float32
    assert sigma_new.shape == (shape if per_element else (b,))
    assert_close(mu_new, ref_mu, atol=1e-5, rtol=1e-5, name="mu_new")
    assert_close(sigma_new, ref_sigma, atol=1e-5, rtol=1e-5, name="sigma_new")


@pytest.mark.parametrize("per_element", [True, False])
@pytest.mark.parametrize("mu_form", ["float", "row", "elem"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_elite_statistics_of_sample_perturb(backend, per_element, mu_form, dtype) -> None:
    """Recover eps = (z - mean) / scale from sample_perturb's output and take the elite stats."""
    b, s, k, t = 2, (3, 6, 5), 12, 4
    gen = torch.Generator().manual_seed(7)
    mean = torch.randn(b, *s, generator=gen)
    mu = {
        "float": 0.3,
        "row": torch.tensor([0.1, -0.2]),
        "elem": 0.1 * torch.randn(b, *s, generator=gen),
    }[mu_form]
    mu = mu.to(dtype) if isinstance(mu, torch.Tensor) else mu
    sigma = torch.tensor([0.8, 1.3])
    scale = torch.tensor([0.5, 2.0])
    seed, rnd = 1234, 5
    z = sample_perturb(mean, mu, sigma, scale, k=k, seed=seed, round=rnd)
    eps = (z.double() - mean.double().unsqueeze(1)) / scale.double().view(b, 1, 1, 1, 1)
    rewards = -(eps - 0.5).square().mean(dim=(2, 3, 4)).float()  # any score works
    idx = topk_select(rewards, t)
    elite = torch.stack([eps[i, idx[i]] for i in range(b)])  # (B, T, *S)
    alpha, floor = 0.6, 0.9
    mu_new, sigma_new = cem_update(
        mu, sigma, idx, shape=(b, *s), k=k, seed=seed, round=rnd,
        alpha=alpha, min_sigma=floor, per_element=per_element,
    )  # fmt: skip
    mu_old = mu.double() if isinstance(mu, torch.Tensor) else torch.tensor(mu).double()
    if mu_form == "row":
        mu_old = mu_old.view(b, 1, 1, 1)
    expected_mu = ((1 - alpha) * mu_old + alpha * elite.mean(1)).expand(b, *s)
    sig_old = sigma.double()
    if per_element:
        std = elite.var(1, unbiased=False).sqrt()
        expected_sigma = ((1 - alpha) * sig_old.view(b, 1, 1, 1) + alpha * std).clamp_min(floor)
    else:
        std = elite.var(1, unbiased=False).mean(dim=(1, 2, 3)).sqrt()
        expected_sigma = ((1 - alpha) * sig_old + alpha * std).clamp_min(floor)
    assert bool((expected_sigma > floor).any())  # the floor does not decide every value
    assert_close(mu_new, expected_mu.float(), atol=1e-4, rtol=1e-4, name="mu_new")
    assert_close(sigma_new, expected_sigma.float(), atol=1e-4, rtol=1e-4, name="sigma_new")


def test_single_elite_gives_zero_std_then_the_floor(backend) -> None:
    idx = torch.tensor([[2], [0]])
    mu_new, sigma_new = cem_update(
        0.0, 1.0, idx, shape=(2, 8), k=4, seed=3, round=0, min_sigma=0.05
    )
    assert torch.equal(sigma_new, torch.full((2, 8), 0.05))
    from smartgrpo_fast.ops import philox_normal

    n = philox_normal((2, 4, 8), seed=3, round=0)
    assert_close(mu_new, torch.stack([n[0, 2], n[1, 0]]), atol=1e-6, rtol=0, name="mu_new")


def test_alpha_one_min_sigma_zero_is_textbook_cem(backend) -> None:
    from smartgrpo_fast.ops import philox_normal

    mu = torch.randn(2, 10)
    sigma = torch.rand(2, 10) + 0.1
    idx = torch.tensor([[0, 3, 5], [1, 2, 4]])
    mu_new, sigma_new = cem_update(mu, sigma, idx, shape=(2, 10), k=6, seed=9, round=4)
    n = philox_normal((2, 6, 10), seed=9, round=4)
    eps = mu.unsqueeze(1) + sigma.unsqueeze(1) * n
    elite = torch.stack([eps[i, idx[i]] for i in range(2)])
    assert_close(mu_new, elite.mean(1), atol=1e-5, rtol=1e-5)
    assert_close(sigma_new, elite.std(1, unbiased=False), atol=1e-5, rtol=1e-5)


def test_int32_and_strided_indices(backend, run_reference) -> None:
    idx64 = torch.tensor([[5, 1, 0, 2], [3, 4, 1, 0]])
    kw = dict(shape=(2, 3, 4), k=6, seed=1, round=1)
    ref = run_reference(cem_update, 0.0, 1.0, idx64[:, ::2].contiguous(), **kw)
    got = cem_update(0.0, 1.0, idx64.int()[:, ::2], **kw)
    assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
    assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5)


def test_out_of_range_index_without_validation_gives_nan_row(backend) -> None:
    idx = torch.tensor([[0, 1], [0, 7]])
    for per_element in (True, False):
        mu_new, sigma_new = cem_update(
            0.0, 1.0, idx, shape=(2, 5), k=4, seed=0, round=0,
            per_element=per_element, validate=False,
        )  # fmt: skip
        assert torch.isfinite(mu_new[0]).all() and torch.isnan(mu_new[1]).all()
        assert torch.isfinite(sigma_new[0]).all() and torch.isnan(sigma_new[1]).all()


def test_tensor_seed_and_round(backend) -> None:
    idx = torch.tensor([[1, 0]])
    a = cem_update(0.0, 1.0, idx, shape=(1, 9), k=3, seed=5, round=2)
    b = cem_update(0.0, 1.0, idx, shape=(1, 9), k=3, seed=torch.tensor(5), round=torch.tensor(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize(
    "b,k,t,s,offset", [(1, 4, 2, (5,), 2), (2, 6, 3, (3, 13), 3), (3, 5, 5, (1027,), 1)]
)
@pytest.mark.parametrize("per_element", [True, False])
def test_row_offset_equals_rows_of_the_larger_call(backend, b, k, t, s, offset, per_element):
    """Rows [o, o + B) of a batch updated with row_offset=o give those rows of the whole call."""
    gen = torch.Generator().manual_seed(5)
    n_rows = offset + b
    mu = 0.2 * torch.randn(n_rows, *s, generator=gen)
    sigma = torch.rand(n_rows, *(s if per_element else ()), generator=gen) + 0.5
    idx = torch.stack([torch.randperm(k, generator=gen)[:t] for _ in range(n_rows)])
    kw = dict(k=k, seed=77, round=3, alpha=0.8, min_sigma=0.01, per_element=per_element)
    big = cem_update(mu, sigma, idx, shape=(n_rows, *s), **kw)
    rows = slice(offset, n_rows)
    part = cem_update(mu[rows], sigma[rows], idx[rows], shape=(b, *s), row_offset=offset, **kw)
    part_t = cem_update(
        mu[rows], sigma[rows], idx[rows], shape=(b, *s), row_offset=torch.tensor(offset), **kw
    )
    for got, got_t, whole, name in zip(part, part_t, big, ("mu_new", "sigma_new"), strict=True):
        assert torch.equal(got, whole[rows]), name  # bit-exact on the same backend
        assert torch.equal(got_t, got), name


def test_row_offset_matches_the_noise_sample_perturb_drew(backend) -> None:
    """cem_update(row_offset=o) regenerates the eps that sample_perturb(row_offset=o) drew."""
    mean = torch.zeros(2, 9)
    z = sample_perturb(mean, 0.5, 2.0, 1.0, k=5, seed=12, round=1, row_offset=7)
    idx = torch.tensor([[4, 1, 2], [0, 3, 2]])
    elite = torch.stack([z[i, idx[i]] for i in range(2)])
    mu_new, sigma_new = cem_update(0.5, 2.0, idx, shape=(2, 9), k=5, seed=12, round=1, row_offset=7)
    assert_close(mu_new, elite.mean(1), atol=1e-5, rtol=1e-5, name="mu_new")
    assert_close(sigma_new, elite.std(1, unbiased=False), atol=1e-5, rtol=1e-5, name="sigma_new")


# --------------------------------------------------------------------------------------
# counts: row b updates from its first counts[b] elites only
# --------------------------------------------------------------------------------------


def _hand_cem(mu, sigma, idx, counts, *, k, seed, rnd, alpha, min_sigma, per_element):
    """cem_update with counts, row by row in float64 over philox_normal's materialised noise.

    mu: (B, D); sigma: (B, D), or (B,) when pooled."""
    b, d = mu.shape
    n = philox_normal((b, k, d), seed=seed, round=rnd).double()
    mu_new, sigma_new = mu.double().clone(), sigma.double().clone()
    for row in range(b):
        c = int(counts[row])
        if c == 0:
            continue  # no elite: unchanged
        s = sigma[row].double() if per_element else sigma[row].double().expand(d)
        elite = mu[row].double() + s * n[row, idx[row, :c]]  # (c, D)
        mean, var = elite.mean(0), elite.var(0, unbiased=False)
        mu_new[row] = (1 - alpha) * mu[row].double() + alpha * mean
        std = var.sqrt() if per_element else var.mean().sqrt()
        sigma_new[row] = ((1 - alpha) * sigma[row].double() + alpha * std).clamp_min(min_sigma)
    return mu_new.float(), sigma_new.float()


COUNTS_CASES = [  # (k, t, counts): none, one, partial and all elites across rows
    (6, 4, [0, 1, 2, 4]),
    (5, 5, [5, 0, 3]),
    (3, 1, [1, 0]),
]


@pytest.mark.parametrize("k,t,counts", COUNTS_CASES)
@pytest.mark.parametrize("per_element", [True, False])
@pytest.mark.parametrize("alpha,min_sigma", [(1.0, 0.0), (0.6, 0.75)])
def test_counts_reference_matches_hand_computation(
    run_reference, k, t, counts, per_element, alpha, min_sigma
) -> None:
    b, d = len(counts), 37
    gen = torch.Generator().manual_seed(11)
    mu = 0.3 * torch.randn(b, d, generator=gen)
    sigma = torch.rand(b, *((d,) if per_element else ()), generator=gen) + 0.5
    idx = torch.stack([torch.randperm(k, generator=gen)[:t] for _ in range(b)])
    counts_t = torch.tensor(counts)
    kw = dict(k=k, seed=19, alpha=alpha, min_sigma=min_sigma, per_element=per_element)
    got = run_reference(cem_update, mu, sigma, idx, shape=(b, d), round=2, counts=counts_t, **kw)
    want = _hand_cem(mu, sigma, idx, counts_t, rnd=2, **kw)
    assert_close(got[0], want[0], atol=1e-5, rtol=1e-5, name="mu_new")
    assert_close(got[1], want[1], atol=1e-5, rtol=1e-5, name="sigma_new")
    keep = counts_t == 0
    assert torch.equal(got[0][keep], mu[keep]) and torch.equal(got[1][keep], sigma[keep])
    if min_sigma > 0:  # the floor decides some value, but never a kept row's
        assert bool((want[1][~keep] == min_sigma).any())


@pytest.mark.parametrize("k,t,counts", COUNTS_CASES)
@pytest.mark.parametrize("s", [(37,), (3, 5, 7)])
@pytest.mark.parametrize("per_element", [True, False])
def test_counts_match_reference(backend, run_reference, k, t, counts, s, per_element) -> None:
    b = len(counts)
    gen = torch.Generator().manual_seed(12)
    mu = 0.3 * torch.randn(b, *s, generator=gen)
    sigma = (torch.rand(b, generator=gen) + 0.5).bfloat16()  # per row, in bf16
    idx = torch.stack([torch.randperm(k, generator=gen)[:t] for _ in range(b)])
    counts_t = torch.tensor(counts)
    kw = dict(shape=(b, *s), k=k, seed=23, round=1, alpha=0.8, min_sigma=0.4,
              per_element=per_element, counts=counts_t, row_offset=2)  # fmt: skip
    got = cem_update(mu, sigma, idx, **kw)
    ref = run_reference(cem_update, mu, sigma, idx, **kw)
    assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5, name="mu_new")
    assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5, name="sigma_new")
    keep = counts_t == 0  # unchanged exactly, broadcast to the output shape
    assert torch.equal(got[0][keep], mu[keep])
    sigma_kept = sigma.float()[keep]
    if per_element:
        sigma_kept = sigma_kept.view(-1, *([1] * len(s))).expand(-1, *s)
    assert torch.equal(got[1][keep], sigma_kept)


def test_counts_of_all_elites_equal_no_counts(backend) -> None:
    idx = torch.tensor([[3, 0, 2], [1, 2, 4]])
    mu, sigma = torch.randn(2, 4, 5), torch.rand(2, 4, 5) + 0.2
    kw = dict(shape=(2, 4, 5), k=5, seed=1, round=0, alpha=0.5, min_sigma=0.1)
    plain = cem_update(mu, sigma, idx, **kw)
    full = cem_update(mu, sigma, idx, counts=torch.tensor([3, 3]), **kw)
    assert_close(full[0], plain[0], atol=1e-6, rtol=1e-6, name="mu_new")
    assert_close(full[1], plain[1], atol=1e-6, rtol=1e-6, name="sigma_new")


def test_counts_one_gives_that_elite_and_zero_std(backend) -> None:
    idx = torch.tensor([[2, 0], [1, 3]])
    mu_new, sigma_new = cem_update(
        0.5, 2.0, idx, shape=(2, 9), k=4, seed=3, round=1, counts=torch.tensor([1, 1])
    )
    n = philox_normal((2, 4, 9), seed=3, round=1)
    assert_close(mu_new, 0.5 + 2.0 * torch.stack([n[0, 2], n[1, 1]]), atol=1e-6, rtol=0)
    assert torch.equal(sigma_new, torch.zeros(2, 9))


def test_counts_use_only_the_leading_indices(backend) -> None:
    """Entries past counts[b] are never read for noise nor validated (e.g. padding)."""
    padded = torch.tensor([[1, 4, -1, 99], [2, 2, 2, 2]])
    clean = torch.tensor([[1, 4, 0, 3], [2, 0, 1, 3]])
    counts = torch.tensor([2, 1])
    kw = dict(shape=(2, 6), k=5, seed=8, round=3, counts=counts)
    a = cem_update(0.1, 1.0, padded, **kw)
    b = cem_update(0.1, 1.0, clean, **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_counts_out_of_range_without_validation_gives_nan_row(backend) -> None:
    idx = torch.tensor([[0, 1], [2, 3], [1, 0]])
    counts = torch.tensor([2, 3, -1])
    for per_element in (True, False):
        mu_new, sigma_new = cem_update(
            0.0, 1.0, idx, shape=(3, 5), k=4, seed=0, round=0, per_element=per_element,
            counts=counts, validate=False,
        )  # fmt: skip
        assert torch.isfinite(mu_new[0]).all() and torch.isfinite(sigma_new[0]).all()
        assert torch.isnan(mu_new[1:]).all() and torch.isnan(sigma_new[1:]).all()
