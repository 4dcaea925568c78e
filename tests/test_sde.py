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


def test_sde_step_at_sigma_one_uses_sigma_max() -> None:
    x, v = torch.randn(1, 3), torch.randn(1, 3)
    step = sde_step(x, v, 1.0, 0.9, sigma_max=0.9)
    assert math.isclose(step.std, 0.7 * math.sqrt(0.9 / 0.1) * math.sqrt(0.1))
    with pytest.raises(ValueError, match="sigma_max"):
        sde_step(x, v, 1.0, 0.9)


def test_sde_step_needs_decreasing_time() -> None:
    with pytest.raises(ValueError, match="sigma_next"):
        sde_step(torch.zeros(1, 2), torch.zeros(1, 2), 0.5, 0.6)


def test_log_prob_is_the_gaussian_mean_over_elements() -> None:
    x, v = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    step = sde_step(x, v, 0.6, 0.5)
    x_next = step.mean + step.std * torch.randn(3, 2, 4)
    expected = torch.distributions.Normal(step.mean, step.std).log_prob(x_next).flatten(1).mean(1)
    assert torch.allclose(sde_log_prob(x_next, step), expected, atol=1e-5)
