"""The Flow-GRPO sampler steps against their formulas."""

from __future__ import annotations

import math

import pytest
import torch

from smartgrpo_fast.sde import flow_sigmas, ode_step, sde_log_prob, sde_step


def test_flow_sigmas_uniform_and_shifted() -> None:
    assert torch.allclose(flow_sigmas(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    s = flow_sigmas(4, shift=3.0)
    t = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    assert torch.allclose(s, 3 * t / (1 + 2 * t))
    assert s[0] == 1.0 and s[-1] == 0.0 and bool((s[1:] < s[:-1]).all())


@pytest.mark.parametrize("kwargs", [{"steps": 0}, {"steps": 4, "shift": 0.0}])
def test_flow_sigmas_errors(kwargs) -> None:
    with pytest.raises(ValueError):
        flow_sigmas(**kwargs)


def test_ode_step_is_euler() -> None:
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.allclose(ode_step(x, v, 0.8, 0.6), x - 0.2 * v)


def test_sde_step_matches_flow_grpo_formula() -> None:
    x, v = torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    sigma, sigma_next, level = 0.7, 0.55, 0.7
    step = sde_step(x, v, sigma, sigma_next, noise_level=level)
    dt = sigma_next - sigma
    std_t = level * math.sqrt(sigma / (1 - sigma))
    mean = (
        x * (1 + std_t**2 / (2 * sigma) * dt) + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    )
    assert torch.allclose(step.mean, mean, atol=1e-6)
    assert math.isclose(step.std, std_t * math.sqrt(-dt))


def test_sde_step_at_sigma_one_substitutes_sigma_max_in_the_denominator_only() -> None:
    # Flow-GRPO: std_t = noise_level * sqrt(sigma / (1 - where(sigma == 1, sigma_max, sigma))).
    x, v = torch.randn(1, 3), torch.randn(1, 3)
    sigma, sigma_next, sigma_max, level = 1.0, 0.9, 0.9, 0.7
    step = sde_step(x, v, sigma, sigma_next, sigma_max=sigma_max, noise_level=level)
    std_t = level * math.sqrt(1.0 / (1.0 - sigma_max))
    assert math.isclose(step.std, std_t * math.sqrt(sigma - sigma_next), rel_tol=1e-12)
    assert math.isclose(step.std, 0.7, rel_tol=1e-9)  # 0.664 before the fix
    dt = sigma_next - sigma
    mean = (
        x * (1 + std_t**2 / (2 * sigma) * dt) + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    )
    assert torch.allclose(step.mean, mean, atol=1e-6)
    with pytest.raises(ValueError, match="sigma_max"):
        sde_step(x, v, 1.0, 0.9)


@pytest.mark.parametrize(("sigma", "sigma_next", "level"), [(0.8, 0.7, 0.8), (1.0, 0.9, 0.5)])
def test_cps_step_matches_flow_grpo_formula(sigma, sigma_next, level) -> None:
    x, v = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    step = sde_step(x, v, sigma, sigma_next, noise_level=level, sde_type="cps")
    std = sigma_next * math.sin(level * math.pi / 2)
    x0, x1 = x - sigma * v, x + (1 - sigma) * v
    mean = (1 - sigma_next) * x0 + math.sqrt(sigma_next**2 - std**2) * x1
    assert step.kind == "cps"
    assert math.isclose(step.std, std, rel_tol=1e-12)
    assert torch.allclose(step.mean, mean, atol=1e-6)
    x_next = mean + std * torch.randn_like(mean)
    expected = -((x_next - mean) ** 2).flatten(1).mean(1)
    assert torch.allclose(sde_log_prob(x_next, step), expected, atol=1e-6)


def test_sde_step_carries_gradient_to_v() -> None:
    x = torch.randn(2, 3)
    v = torch.randn(2, 3, requires_grad=True)
    for kind in ("sde", "cps"):
        step = sde_step(x, v, 0.6, 0.5, sde_type=kind)
        x_next = step.mean.detach() + step.std * torch.randn(2, 3)
        (g,) = torch.autograd.grad(sde_log_prob(x_next, step).sum(), v)
        assert g.abs().sum() > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sde_type": "ode"}, "sde_type"),
        ({"noise_level": 0.0}, "noise_level"),
        ({"sde_type": "cps", "sigma_next": 0.0}, "sigma_next"),
    ],
)
def test_sde_step_argument_errors(kwargs, match) -> None:
    kwargs = {"sigma_next": 0.4, **kwargs}
    with pytest.raises(ValueError, match=match):
        sde_step(torch.zeros(1, 2), torch.zeros(1, 2), 0.5, **kwargs)


def test_sde_step_needs_decreasing_time() -> None:
    with pytest.raises(ValueError, match="sigma_next"):
        sde_step(torch.zeros(1, 2), torch.zeros(1, 2), 0.5, 0.6)


def test_log_prob_is_the_gaussian_mean_over_elements() -> None:
    x, v = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    step = sde_step(x, v, 0.6, 0.5)
    x_next = step.mean + step.std * torch.randn(3, 2, 4)
    expected = torch.distributions.Normal(step.mean, step.std).log_prob(x_next).flatten(1).mean(1)
    assert torch.allclose(sde_log_prob(x_next, step), expected, atol=1e-5)
