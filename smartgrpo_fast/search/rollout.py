"""Searched, random and best-of-M noise compared on the same rollouts.

For each prompt, one rollout from seeded initial noise ``x_T``: ODE steps down to SDE step
``S``, then three continuations of that step, each finished by the ODE to ``t = 0`` and scored
by the reward:

* ``random``: eps ~ N(0, I), what plain Flow-GRPO draws;
* ``bestof``: the best of M = K*N one-step-scored draws from N(0, I) (the baseline a search
  must beat at equal model calls);
* ``searched``: the CEM search's eps* (:class:`~smartgrpo_fast.search.NoiseSearch`).

Everything is keyed by seeds and by each prompt's index in the list: the initial noise, the
random eps and the searches' noise of prompt i are rows i of their Philox streams (one search
seed for all batches, ``row_offset`` = the batch's first index), so the same prompts and seeds
give the same per-prompt numbers at any ``batch`` (up to the float rounding of the model at
another batch size).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from smartgrpo_fast.models.base import decode_latents, has_preview_decoder
from smartgrpo_fast.ops import philox_normal
from smartgrpo_fast.rewards.base import Reward
from smartgrpo_fast.sde import (
    check_time_shift,
    flow_sigmas,
    integrate_ode,
    schedule_shift,
    sde_step,
)
from smartgrpo_fast.search.cem import NoiseSearch
from smartgrpo_fast.search.config import RoundStats, SearchConfig, SearchResult

__all__ = ["Comparison", "RolloutConfig", "compare_noise", "model_calls", "paired_stats"]


@dataclass(frozen=True)
class RolloutConfig:
    """The sampler around the searched step.

    Attributes:
        steps: sampling steps from t = 1 to 0 (Flow-GRPO trains with 10).
        step: the searched SDE step, 0 <= step < steps. 4 (t 0.82 -> 0.75 of 10 steps at
            shift 3): the one-step x0 estimate must already be recognisable, and the step early
            enough to decide composition. On the embedded model (shift 3) the searched images
            matched their prompts 91% (32 prompts) and 88% (64) of the time at step 4 against
            75% and 77% for random noise; at step 2 (t 0.92 -> 0.88) 72% against 72%.
        shift: the schedule's time shift; None = the model's (``sde.schedule_shift``: 3 for
            SD3 and for the embedded model, both from their configs).
        noise_level: Flow-GRPO's SDE noise level (0.7).
        seed: keys the initial noise and the random eps (Philox, row = the prompt's index).
        batch: prompts searched together (B; the search runs B*K rows per forward). Results
            per prompt do not depend on it (module docstring).
    """

    steps: int = 10
    step: int = 4
    shift: float | None = None
    noise_level: float = 0.7
    seed: int = 0
    batch: int = 32

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps: expected >= 1, got {self.steps}")
        if not 0 <= self.step < self.steps:
            raise ValueError(f"step: expected 0 <= step < steps = {self.steps}, got {self.step}")
        if self.shift is not None:
            check_time_shift(self.shift)
        if not self.noise_level > 0:
            raise ValueError(f"noise_level: expected > 0, got {self.noise_level}")
        if self.batch < 1:
            raise ValueError(f"batch: expected >= 1, got {self.batch}")
        if not 0 <= self.seed < 2**62:
            raise ValueError(f"seed: expected 0 <= seed < 2**62, got {self.seed}")


@dataclass
class Comparison:
    """Final rewards (B,) float32 and images (B, 3, H, W) of the three continuations, the two
    searches' per-round statistics (rounds x B), the seconds spent in each search and the
    schedule's time shift used."""

    prompts: list[str]
    reward_searched: torch.Tensor
    reward_random: torch.Tensor
    reward_bestof: torch.Tensor
    images_searched: torch.Tensor
    images_random: torch.Tensor
    images_bestof: torch.Tensor
    rounds: RoundStats
    rounds_bestof: RoundStats
    seconds: dict[str, float] = field(default_factory=dict)
    candidates: int = 0
    shift: float = 1.0
    calls: dict[str, dict[str, int]] = field(default_factory=dict)


def model_calls(
    search: SearchConfig,
    rollout: RolloutConfig,
    guidance_scale: float = 1.0,
    *,
    preview: bool = False,
) -> dict[str, dict[str, int]]:
    """Model calls per rollout of each continuation (``random``, ``bestof``, ``searched``):
    ``transformer_rows`` (latents through the transformer; classifier-free guidance doubles
    each; a search candidate costs ``preview_steps`` rows), ``decodes`` (full decodes by the
    model's VAE), ``preview_decodes`` (decodes of the search's estimates by a preview
    decoder, ``preview=True``: K*N of them instead of K*N full decodes; 0 without one) and
    ``reward_images``. Each continuation counts the rollout's
    shared prefix (the ODE steps to step S and the velocity at S) as if it ran alone, so the
    three are comparable: best-of-M and the search spend the same, random m*K*N rows less."""
    g = 2 if guidance_scale > 1.0 else 1
    base = rollout.steps  # S prefix steps, the velocity at S, steps - S - 1 after it
    m, rows = search.model_calls, search.forward_rows
    plain = {"transformer_rows": g * base, "decodes": 1, "preview_decodes": 0, "reward_images": 1}
    searched = {
        "transformer_rows": g * (base + rows),
        "decodes": 1 if preview else 1 + m,
        "preview_decodes": m if preview else 0,
        "reward_images": 1 + m,
    }
    return {"random": plain, "bestof": dict(searched), "searched": searched}


def paired_stats(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Paired comparison of a over b: mean and std (ddof 1) of the differences, the paired
    t statistic (df = n - 1; NaN when n < 2 or the differences do not vary) and the win rate."""
    d = (a.double() - b.double()).flatten()
    n = d.numel()
    mean = float(d.mean()) if n else float("nan")
    std = float(d.std()) if n > 1 else float("nan")
    t = mean / (std / math.sqrt(n)) if n > 1 and std > 0 else float("nan")
    return {"n": n, "mean_diff": mean, "std_diff": std, "t": t, "df": n - 1,
            "win_rate": float((d > 0).double().mean()) if n else float("nan")}  # fmt: skip


def _cat_stats(parts: list[RoundStats]) -> RoundStats:
    return RoundStats(*(torch.cat([getattr(p, f) for p in parts], dim=1)
                        for f in ("best", "elite_mean", "mean", "nan_count")))  # fmt: skip


@torch.no_grad()
def compare_noise(
    model: Any,
    reward: Reward,
    prompts: list[str],
    search: SearchConfig | None = None,
    rollout: RolloutConfig | None = None,
    *,
    progress: bool = False,
    search_model: Any = None,
) -> Comparison:
    """Run the three continuations of every prompt's rollout (module docstring).

    ``search_model``: the model whose forwards score the searches' candidates (default
    ``model``; e.g. ``model.for_search("float8")``); the rollouts' own steps run on ``model``.
    """
    search = search or SearchConfig()
    rollout = rollout or RolloutConfig()
    if isinstance(prompts, str) or not prompts:
        raise TypeError("prompts: expected a non-empty list of strings")
    shift = schedule_shift(model) if rollout.shift is None else rollout.shift
    sigmas = flow_sigmas(rollout.steps, shift).tolist()
    s_idx = rollout.step
    sigma, sigma_next = sigmas[s_idx], sigmas[s_idx + 1]
    n, shape = len(prompts), tuple(model.latent_shape)
    dev = getattr(model, "device", torch.device("cpu"))
    x_t = philox_normal((n, 1, *shape), seed=rollout.seed, round=0).squeeze(1).to(dev)
    eps_random = philox_normal((n, 1, *shape), seed=rollout.seed, round=1).squeeze(1).to(dev)
    scorer = model if search_model is None else search_model
    cem = NoiseSearch(scorer, reward, search)
    best_of = NoiseSearch(scorer, reward, replace(search, strategy="best_of"))
    out: dict[str, list[torch.Tensor]] = {key: [] for key in ("searched", "random", "bestof")}
    images: dict[str, list[torch.Tensor]] = {key: [] for key in out}
    stats: dict[str, list[RoundStats]] = {"searched": [], "bestof": []}
    seconds = {"searched": 0.0, "bestof": 0.0}
    chunks = list(range(0, n, rollout.batch))
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="prompts", unit="batch")
    for start in chunks:
        sl = slice(start, min(n, start + rollout.batch))
        chunk = prompts[sl]
        cond = model.encode_prompts(chunk)
        x = integrate_ode(model, cond, x_t[sl], sigmas[: s_idx + 1])
        step = sde_step(x, model.velocity(x, sigma, cond), sigma, sigma_next,
                        noise_level=rollout.noise_level, sigma_max=sigmas[1])  # fmt: skip
        eps: dict[str, torch.Tensor] = {"random": eps_random[sl]}
        for key, searcher in (("searched", cem), ("bestof", best_of)):
            t0 = time.perf_counter()
            # one seed for every batch; prompt i draws row i of the stream, whatever the batch
            res: SearchResult = searcher.run(step.mean, step.std, sigma_next, cond,
                                             seed=search.seed, row_offset=start,
                                             progress=progress)  # fmt: skip
            eps[key] = res.eps
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            seconds[key] += time.perf_counter() - t0
            stats[key].append(res.rounds)
        for key in out:
            x_next = (step.mean + step.std * eps[key].float()).to(x.dtype)
            # the end of the trajectory is in the model's (VAE-scaled) space: un-scale it
            img = decode_latents(model, integrate_ode(model, cond, x_next, sigmas[s_idx + 1 :]))
            images[key].append(img.cpu())
            out[key].append(reward(img, chunk).float().cpu())
    return Comparison(
        shift=shift,
        prompts=list(prompts),
        reward_searched=torch.cat(out["searched"]),
        reward_random=torch.cat(out["random"]),
        reward_bestof=torch.cat(out["bestof"]),
        images_searched=torch.cat(images["searched"]),
        images_random=torch.cat(images["random"]),
        images_bestof=torch.cat(images["bestof"]),
        rounds=_cat_stats(stats["searched"]),
        rounds_bestof=_cat_stats(stats["bestof"]),
        seconds=seconds,
        candidates=search.model_calls,
        calls=model_calls(
            search,
            rollout,
            float(getattr(model, "guidance_scale", 1.0)),
            preview=has_preview_decoder(scorer),
        ),
    )
