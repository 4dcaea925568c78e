"""The Flow-GRPO sampler steps (ODE and SDE), shared by the search and the trainer.

Flow matching, SD3 convention: ``x_t = (1 - t) x0 + t eps``, velocity ``v = eps - x0``.
A step goes from ``sigma`` to ``sigma_next < sigma`` (``dt = sigma_next - sigma < 0``):

* ODE (Euler): ``x_next = x + dt v``.
* SDE (Flow-GRPO's ``"sde"``): ``std_t = noise_level * sqrt(sigma / (1 - sigma'))`` where
  ``sigma' = sigma_max`` (the schedule's next value) when ``sigma == 1``, else ``sigma``: the
  substitution is in the denominator only. ``mean = x (1 + std_t^2 / (2 sigma) dt) +
  v (1 + std_t^2 (1 - sigma) / (2 sigma)) dt``, ``x_next = mean + std_t sqrt(-dt) eps``; the
  log-probability of ``x_next`` is that of N(mean, (std_t sqrt(-dt))^2), averaged over the
  non-batch dimensions.
* CPS (Flow-GRPO's ``"cps"``, used by Flow-GRPO-Fast): ``std = sigma_next sin(noise_level pi/2)``,
  ``x0 = x - sigma v``, ``x1 = x + (1 - sigma) v``, ``mean = (1 - sigma_next) x0 +
  sqrt(sigma_next^2 - std^2) x1``, ``x_next = mean + std eps``; its log-probability is
  ``-(x_next - mean)^2`` averaged over the non-batch dimensions (constants dropped, as there).

Both are computed in float32 (bf16 overflows) and differentiable in ``x`` and ``v``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

__all__ = [
    "SDE_TYPES",
    "SDEStep",
    "check_time_shift",
    "flow_sigmas",
    "integrate_ode",
    "ode_step",
    "sample_ode",
    "schedule_shift",
    "sde_log_prob",
    "sde_step",
    "shift_times",
]


def check_time_shift(shift: float, name: str = "shift") -> float:
    """``shift`` as a float; a ValueError naming ``name`` unless it is finite and > 0."""
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"{name}: expected a finite value > 0, got {shift}")
    return float(shift)


def shift_times(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's time shift of flow times t in [0, 1]: ``s t / (1 + (s - 1) t)`` (s > 1 moves
    them toward noise; 1 = identity). Shapes the sampling schedule and the trainer's times."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def flow_sigmas(steps: int, shift: float = 1.0, device: torch.device | str = "cpu") -> torch.Tensor:
    """(steps + 1,) float32 flow times from 1 to 0, time-shifted like SD3's scheduler
    (:func:`shift_times`; shift 3.0 for SD3; 1.0 = uniform)."""
    if steps < 1:
        raise ValueError(f"steps: expected >= 1, got {steps}")
    check_time_shift(shift)
    t = torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float32)
    return shift_times(t, shift)


def ode_step(x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """Euler step of the probability-flow ODE, computed in float32, returned in x's dtype."""
    return (x.float() + (sigma_next - sigma) * v.float()).to(x.dtype)


SDE_TYPES = ("sde", "cps")


@dataclass(frozen=True)
class SDEStep:
    """One Flow-GRPO stochastic step: ``x_next = mean + std * eps``, eps ~ N(0, I).

    Attributes:
        mean: (N, *S) float32, the step's mean (carries gradient when x or v does).
        std: the scale that multiplies eps (``sample_perturb``'s ``scale``).
        kind: ``"sde"`` or ``"cps"``; decides :func:`sde_log_prob`'s form.
    """

    mean: torch.Tensor
    std: float
    kind: str = "sde"


def sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: float,
    sigma_next: float,
    *,
    noise_level: float = 0.7,
    sigma_max: float | None = None,
    sde_type: str = "sde",
) -> SDEStep:
    """The Gaussian of one Flow-GRPO stochastic step from ``sigma`` to ``sigma_next``.

    Args:
        x, v: (N, *S) latents at ``sigma`` and the model's velocity there (any float dtype).
        sigma, sigma_next: flow times, ``sigma_next < sigma``.
        noise_level: Flow-GRPO's noise level (0.7 for ``"sde"``, 0.8 for Fast's ``"cps"``).
        sigma_max: the schedule's value after 1.0; needed by ``"sde"`` when ``sigma == 1``.
        sde_type: ``"sde"`` or ``"cps"`` (module docstring).

    Returns:
        :class:`SDEStep`; ``std`` is ``sample_perturb``'s ``scale``.
    """
    if sde_type not in SDE_TYPES:
        raise ValueError(f"sde_type: expected one of {', '.join(SDE_TYPES)}, got {sde_type!r}")
    dt = sigma_next - sigma
    if not dt < 0:
        raise ValueError(f"sigma_next: expected < sigma = {sigma}, got {sigma_next}")
    if not (math.isfinite(noise_level) and noise_level > 0):
        raise ValueError(f"noise_level: expected a finite value > 0, got {noise_level}")
    xf, vf = x.float(), v.float()
    if sde_type == "cps":
        if not sigma_next > 0:
            raise ValueError(
                f"sigma_next: the cps step needs sigma_next > 0 (its std is sigma_next * "
                f"sin(noise_level pi / 2)), got {sigma_next}; keep the last step an ODE step"
            )
        std = sigma_next * math.sin(noise_level * math.pi / 2)
        x0 = xf - sigma * vf
        x1 = xf + (1.0 - sigma) * vf
        mean = (1.0 - sigma_next) * x0 + math.sqrt(max(sigma_next**2 - std**2, 0.0)) * x1
        return SDEStep(mean, std, "cps")
    denom = sigma
    if sigma >= 1.0:
        if sigma_max is None or not 0 < sigma_max < 1:
            raise ValueError("sigma_max: at sigma == 1 give the schedule's next value in (0, 1)")
        denom = sigma_max
    std_t = noise_level * math.sqrt(sigma / (1.0 - denom))
    mean = (
        xf * (1.0 + std_t**2 / (2.0 * sigma) * dt)
        + vf * (1.0 + std_t**2 * (1.0 - sigma) / (2.0 * sigma)) * dt
    )
    return SDEStep(mean, std_t * math.sqrt(-dt), "sde")


def sde_log_prob(x_next: torch.Tensor, step: SDEStep) -> torch.Tensor:
    """(N,) float32 log-probability of ``x_next`` under the step, averaged over the non-batch
    dimensions (Flow-GRPO): the Gaussian N(mean, std^2) for ``"sde"``, ``-(x_next - mean)^2``
    for ``"cps"``."""
    diff = x_next.float() - step.mean
    if step.kind == "cps":
        return (-(diff**2)).flatten(1).mean(dim=1)
    lp = -(diff**2) / (2 * step.std**2) - math.log(step.std) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(dim=1)


def schedule_shift(model) -> float:
    """The time shift a model samples with: its ``time_shift`` attribute (SD3: the scheduler's
    ``shift``, 3.0; the embedded model: ``config.json``), else 1.0 (uniform steps)."""
    return check_time_shift(float(getattr(model, "time_shift", 1.0)), "model.time_shift")


@torch.no_grad()
def sample_ode(
    model,
    cond,
    z: torch.Tensor,
    *,
    steps: int = 40,
    shift: float | None = None,
    k: int = 1,
    t_start: float | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Integrate the ODE from ``z`` (B*k, C, H, W) at t = 1 (or ``t_start``) to t = 0.

    ``shift`` defaults to the model's (:func:`schedule_shift`). Returns the final latents (the
    model's x0 space), in z's dtype.
    """
    sigmas = flow_sigmas(steps, schedule_shift(model) if shift is None else shift)
    if t_start is not None:
        sigmas = sigmas[sigmas <= t_start + 1e-6]
        if sigmas[0] < t_start - 1e-6:
            sigmas = torch.cat([torch.tensor([t_start]), sigmas])
    return integrate_ode(model, cond, z, sigmas.tolist(), k=k, progress=progress)


@torch.no_grad()
def integrate_ode(
    model, cond, x: torch.Tensor, sigmas: list[float], *, k: int = 1, progress: bool = False
) -> torch.Tensor:
    """Euler steps of the ODE along ``sigmas`` (flow times, decreasing; fewer than two: no
    step) from ``x`` (B*k, C, H, W) at ``sigmas[0]``; returns x at ``sigmas[-1]``, x's dtype."""
    pairs = list(itertools.pairwise(sigmas))
    if progress:
        from tqdm.auto import tqdm

        pairs = tqdm(pairs, desc="ODE", leave=False)
    for s, s_next in pairs:
        x = ode_step(x, model.velocity(x, s, cond, k=k), s, s_next)
    return x
