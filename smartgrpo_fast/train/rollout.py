"""GRPO rollouts with searched, random or best-of-M noise at the SDE steps.

One optimizer step samples ``G`` rollouts for each of its prompts. Rollout ``r`` of prompt
``p`` (global index over the step's prompts) is global row ``p * G + r``; every draw is keyed
by (run seed, purpose, optimizer step, SDE step) through :func:`~.data.derive_seed` and by the
global row through the fused ops' ``row_offset``, so the rollouts are the same for any
``sample.batch`` and any number of processes.

Along the model's schedule (``sde.flow_sigmas(steps, shift)``) the steps inside the SDE window
are stochastic (:func:`smartgrpo_fast.sde.sde_step`), the others Euler ODE steps. At an SDE
step the noise ``eps`` is

* ``random``: ``philox_normal`` rows (plain Flow-GRPO);
* ``smart``: :class:`~smartgrpo_fast.search.NoiseSearch` (CEM), one independent search per
  rollout (each row is its own search with its own seed: a group keeps its spread, also when
  its rollouts share x_T);
* ``bestof``: the same search object with ``strategy="best_of"`` (M = K*N draws, equal calls),

and ``x_next = mean + std * eps`` gets the log-probability of the policy's own Gaussian
N(mean, std^2) (``sde.sde_log_prob``), whatever chose eps. ``search_steps`` limits the search to
the window's first or last steps (the others take the ``random`` draw of that step). When the search
chose a candidate it evaluated (``use: best``, ``best_of``), its velocity at ``x_next`` is
the next step's: that forward is not made again (``reuse_velocity``; the search's batch of
B*K rows computed it, so it equals a forward of the rollout's batch up to the float order a
batch size changes). Latents and log-probabilities are
float32 whatever the model's dtype. Each rollout starts from its own x_T (keyed by its global
row), or with ``shared_initial_noise`` from its prompt's (keyed by the prompt's global index).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from smartgrpo_fast.models.base import Cond, decode_latents
from smartgrpo_fast.ops import philox_normal
from smartgrpo_fast.sde import ode_step, sde_log_prob, sde_step
from smartgrpo_fast.search import NoiseSearch
from smartgrpo_fast.train.data import derive_seed

__all__ = ["Rollouts", "sample_rollouts", "sde_window"]


@dataclass
class Rollouts:
    """The rollouts of one optimizer step on this process (R rows, W SDE steps).

    Attributes:
        prompts: the R prompt strings, row order (``G`` consecutive rows per prompt).
        groups: (R,) int64 global prompt index of each row (advantages are per group).
        cond: conditioning of the R rows (one prompt per row).
        sigmas: the schedule (steps + 1 flow times).
        sde_steps: the W schedule indices sampled with the SDE (the window).
        latents: (R, W, C, H, W) float32, x before each SDE step.
        next_latents: (R, W, C, H, W) float32, x after it (what the log-probability scores).
        log_probs: (R, W) float32, log-probability of next_latents under the policy.
        images: (R, 3, H, W) float32 in [0, 1], the decoded final samples.
        rewards: (R,) float32 final rewards (NaN where the reward was not finite).
        search_gain: (R, W) float32, the best one-step reward the search found minus the mean
            one-step reward of its first round's candidates (0 for ``random`` noise and at the
            SDE steps not searched).
        searched_steps: the schedule indices of ``sde_steps`` that took searched noise.
        seconds: wall time spent in ``search``, ``rollout`` (the rest of sampling) and
            ``reward`` (waiting for the final scores).
        model_calls: velocity rows evaluated per rollout (sampling plus search candidates,
            less the sampling forwards the search's velocity replaced), averaged over the
            rollouts (an int when every batch made as many).
    """

    prompts: list[str]
    groups: torch.Tensor
    cond: Cond
    sigmas: list[float]
    sde_steps: list[int]
    latents: torch.Tensor
    next_latents: torch.Tensor
    log_probs: torch.Tensor
    images: torch.Tensor
    rewards: torch.Tensor
    search_gain: torch.Tensor
    searched_steps: list[int] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    model_calls: int | float = 0

    @property
    def size(self) -> int:
        """R, the number of rollouts."""
        return len(self.prompts)


def sde_window(seed: int, step: int, size: int, lo: int, hi: int) -> list[int]:
    """The SDE steps of optimizer step ``step``: ``size`` consecutive schedule indices starting
    at a start drawn uniformly from ``lo .. hi - size`` (keyed by seed and step)."""
    span = hi - size - lo + 1
    if span < 1:
        raise ValueError(f"sde_window_range: [{lo}, {hi}) cannot hold {size} steps")
    start = lo + derive_seed(seed, "window", step) % span
    return list(range(start, start + size))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def sample_rollouts(
    model: Any,
    reward: Any,
    prompts: list[str],
    *,
    first_prompt: int,
    group_size: int,
    step: int,
    seed: int,
    sigmas: list[float],
    sde_steps: list[int],
    noise: str,
    searcher: NoiseSearch | None,
    noise_level: float = 0.7,
    sde_type: str = "sde",
    batch: int = 64,
    async_reward: Any | None = None,
    shared_initial_noise: bool = False,
    search_steps: int | None = None,
    search_steps_at: str = "end",
    reuse_velocity: bool = True,
) -> Rollouts:
    """Sample ``group_size`` rollouts of each prompt (module docstring).

    Args:
        model: a FlowModel; ``reward``: a Reward for the final images.
        prompts: this process's P prompts; ``first_prompt`` is the global index of the first.
        group_size: G rollouts per prompt; row ``(first_prompt + p) * G + r`` is global.
        step: the optimizer step (1-based), part of every draw's key; ``seed``: the run's.
        sigmas: the schedule; ``sde_steps``: the indices sampled with the SDE.
        noise: ``smart``, ``bestof`` (both through ``searcher``) or ``random``.
        batch: rollouts sampled together (does not change the result).
        async_reward: an :class:`~smartgrpo_fast.rewards.combine.AsyncReward` around ``reward``
            to score a batch's images while the next batch is sampled, or None.
        shared_initial_noise: one x_T per prompt (keyed by the prompt's global index) for all
            its G rollouts, instead of one per rollout (keyed by the global row).
        search_steps: how many of ``sde_steps`` take searched noise (the rest take the
            ``random`` draw); None: all of them. ``search_steps_at``: ``end`` (the last ones)
            or ``start`` (the first ones).
        reuse_velocity: after a searched step whose result carries the velocity at
            ``x_next`` (``SearchResult.velocity``, every row with a finite reward, the
            searcher on ``model`` itself), the next step takes it instead of a forward.
    """
    if noise in ("smart", "bestof") and searcher is None:
        raise ValueError(f"searcher: noise={noise!r} needs a NoiseSearch")
    if search_steps is not None and not 0 <= search_steps <= len(sde_steps):
        raise ValueError(
            f"search_steps: expected None or 0 <= search_steps <= {len(sde_steps)} (the SDE "
            f"steps), got {search_steps!r}"
        )
    if search_steps_at not in ("start", "end"):
        raise ValueError(f"search_steps_at: expected 'start' or 'end', got {search_steps_at!r}")
    searched = [] if noise == "random" else list(sde_steps)
    if search_steps is not None:
        n = search_steps
        searched = searched[:n] if search_steps_at == "start" else searched[len(searched) - n :]
    reuse = reuse_velocity and searcher is not None and searcher.model is model
    n_rows = len(prompts) * group_size
    row0 = first_prompt * group_size
    shape = tuple(model.latent_shape)
    dev = torch.device(getattr(model, "device", "cpu"))
    cond_prompts = model.encode_prompts(list(prompts))
    row_index = torch.arange(len(prompts), device=dev).repeat_interleave(group_size)
    cond = cond_prompts.select(row_index)
    row_prompts = [p for p in prompts for _ in range(group_size)]
    if shared_initial_noise:
        x_t = philox_normal((len(prompts), 1, *shape), seed=derive_seed(seed, "x_T", step),
                            round=1, device=dev, row_offset=first_prompt)  # fmt: skip
        x_t = x_t.squeeze(1).repeat_interleave(group_size, dim=0)
    else:
        x_t = philox_normal((n_rows, 1, *shape), seed=derive_seed(seed, "x_T", step), round=0,
                            device=dev, row_offset=row0).squeeze(1)  # fmt: skip
    w = len(sde_steps)
    latents = torch.empty((n_rows, w, *shape), device=dev)
    next_latents = torch.empty_like(latents)
    log_probs = torch.empty((n_rows, w), device=dev)
    gain = torch.zeros((n_rows, w), device=dev)
    images, pending = [], []
    seconds = {"search": 0.0, "rollout": 0.0, "reward": 0.0}
    rows_evaluated = 0  # velocity rows over all rollouts
    t_start = time.perf_counter()
    for lo in range(0, n_rows, batch):
        hi = min(n_rows, lo + batch)
        c = cond.select(list(range(lo, hi)))
        x = x_t[lo:hi]
        v_next = None  # the velocity at x the last search computed
        for i, (s, s_next) in enumerate(itertools.pairwise(sigmas)):
            if v_next is None:
                v = model.velocity(x, s, c)
                rows_evaluated += hi - lo
            else:
                v, v_next = v_next, None
            if i not in sde_steps:
                x = ode_step(x, v, s, s_next)
                continue
            j = sde_steps.index(i)
            st = sde_step(x, v, s, s_next, noise_level=noise_level, sigma_max=sigmas[1],
                          sde_type=sde_type)  # fmt: skip
            if i not in searched:
                key = derive_seed(seed, "eps", step)
                eps = philox_normal((hi - lo, 1, *shape), seed=key, round=i, device=dev,
                                    row_offset=row0 + lo).squeeze(1)  # fmt: skip
            else:
                _sync(dev)
                t0 = time.perf_counter()
                res = searcher.run(st.mean, st.std, s_next, c,
                                   seed=derive_seed(seed, "search", step, i),
                                   row_offset=row0 + lo)  # fmt: skip
                eps = res.eps
                gain[lo:hi, j] = torch.nan_to_num(res.best_reward - res.rounds.mean[0])
                rows_evaluated += (hi - lo) * searcher.config.forward_rows
                if (
                    reuse
                    and i + 2 < len(sigmas)
                    and res.velocity is not None
                    and bool(torch.isfinite(res.best_reward).all())
                ):
                    v_next = res.velocity
                _sync(dev)
                seconds["search"] += time.perf_counter() - t0
            x_next = st.mean + st.std * eps
            latents[lo:hi, j] = x
            next_latents[lo:hi, j] = x_next
            log_probs[lo:hi, j] = sde_log_prob(x_next, st)
            x = x_next
        img = decode_latents(model, x)
        images.append(img)
        if async_reward is not None:
            pending.append(async_reward.submit(img, row_prompts[lo:hi]))
    _sync(dev)
    sampled = time.perf_counter()
    if async_reward is not None:
        scores = [f.result() for f in pending]
    else:
        scores = [reward(img, row_prompts[lo : lo + len(img)])
                  for lo, img in zip(range(0, n_rows, batch), images, strict=True)]  # fmt: skip
    r = torch.cat([s.float().to(dev) for s in scores])
    r = torch.where(torch.isfinite(r), r, torch.full_like(r, float("nan")))
    _sync(dev)
    seconds["reward"] = time.perf_counter() - sampled
    seconds["rollout"] = sampled - t_start - seconds["search"]
    calls = rows_evaluated // n_rows if rows_evaluated % n_rows == 0 else rows_evaluated / n_rows
    return Rollouts(
        prompts=row_prompts,
        groups=(first_prompt + row_index).to(torch.int64),
        cond=cond,
        sigmas=list(sigmas),
        sde_steps=list(sde_steps),
        latents=latents,
        next_latents=next_latents,
        log_probs=log_probs,
        images=torch.cat(images),
        rewards=r,
        search_gain=gain,
        searched_steps=searched,
        seconds=seconds,
        model_calls=calls,
    )
