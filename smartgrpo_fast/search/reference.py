"""The noise search written plainly: materialised noise, an eager model, a Python loop.

This is what :class:`~smartgrpo_fast.search.NoiseSearch` computes, without fused ops, device
state or graphs. With ``noise="philox"`` it draws the very noise the fused ops draw (through
:func:`~smartgrpo_fast.ops.philox_normal`), so tests use it as an oracle (same elites, same mu
and sigma); with ``noise="torch"`` it draws ``torch.randn`` and is the naive baseline the
benchmarks time.
"""

from __future__ import annotations

from typing import Any

import torch

from smartgrpo_fast.models.base import Cond, preview_decode, preview_unscaling
from smartgrpo_fast.ops import philox_normal, topk_select_reference
from smartgrpo_fast.rewards.base import Reward
from smartgrpo_fast.search.cem import check_search_inputs, finite_or_nan, rescale_rows
from smartgrpo_fast.search.config import RoundStats, SearchConfig, SearchResult

__all__ = ["search_reference"]


@torch.no_grad()
def search_reference(
    model: Any,
    reward: Reward,
    mean: torch.Tensor,
    scale: float | torch.Tensor,
    t_next: float,
    cond: Cond,
    config: SearchConfig | None = None,
    *,
    seed: int | None = None,
    row_offset: int = 0,
    noise: str = "philox",
    generator: torch.Generator | None = None,
) -> SearchResult:
    """The search of :meth:`NoiseSearch.run`, plainly; same arguments and result.

    ``noise="philox"`` reproduces NoiseSearch's noise exactly (rows ``row_offset`` ..
    ``row_offset + B - 1`` of the stream, as ``NoiseSearch.run(row_offset=)``);
    ``noise="torch"`` draws ``torch.randn`` on ``mean``'s device from ``generator``, which
    must live on that device (the naive baseline; ``use="sample"`` then draws from it too, and
    ``row_offset`` is ignored).
    """
    cfg = config or SearchConfig()
    if noise not in ("philox", "torch"):
        raise ValueError(f"noise: expected 'philox' or 'torch', got {noise!r}")
    mean, scale_t, t, prompts = check_search_inputs(model, mean, scale, t_next, cond)
    seed = cfg.seed if seed is None else seed
    b, k, s = mean.shape[0], cfg.k, tuple(mean.shape[1:])
    dev = mean.device
    ones = [1] * len(s)

    def draw(shape: tuple[int, ...], rnd: int) -> torch.Tensor:
        if noise == "philox":
            return philox_normal(shape, seed=seed, round=rnd, device=dev, row_offset=row_offset)
        # Drawn on mean's device (a fair baseline: no host draw and copy per round); a
        # generator must live on that device too.
        return torch.randn(shape, generator=generator, device=dev)

    mu = torch.full(mean.shape, cfg.mu0, device=dev)
    sigma = torch.full(mean.shape if cfg.per_element else (b,), cfg.sigma0, device=dev)
    best_r = torch.full((b,), float("-inf"), device=dev)
    best_eps = mu.clone()
    best_v = torch.zeros(mean.shape, device=dev)  # the velocity at best_eps's candidate
    stats = torch.full((4, cfg.rounds, b), float("nan"), device=dev)
    prompts_k = [p for p in prompts for _ in range(k)]
    scaling, shift = preview_unscaling(model)  # the decoder that reads the estimates
    for rnd in range(cfg.rounds):
        sig = sigma.view(b, 1, *ones) if not cfg.per_element else sigma.unsqueeze(1)
        eps = mu.unsqueeze(1) + sig * draw((b, k, *s), rnd)  # (B, K, *S)
        z = mean.unsqueeze(1) + scale_t.view(b, 1, *ones) * eps
        zf = z.reshape(b * k, *s)
        x, t_i = zf, t
        v = v0 = model.velocity(x, t_i, cond, k=k).float()
        for i in range(1, cfg.preview_steps):  # Euler steps on the times t (1 - i / m)
            t_n = t * (1.0 - i / cfg.preview_steps)
            x = x + (t_n - t_i) * v
            t_i = t_n
            v = model.velocity(x, t_i, cond, k=k).float()
        x0 = (x - t_i * v) / scaling + shift
        images = preview_decode(model, x0, cfg.decode_size)
        r = finite_or_nan(reward(images, prompts_k).float().to(dev).view(b, k))
        elite = topk_select_reference(r, cfg.top)  # NaN last, ties to the lower index
        r_elite = r.gather(1, elite)
        stats[:, rnd] = torch.stack(
            [r_elite[:, 0], r_elite.mean(1), r.nanmean(1), torch.isnan(r).sum(1).float()]
        )
        better = r_elite[:, 0] > best_r
        best_r = torch.where(better, r_elite[:, 0], best_r)
        eps_best = eps[torch.arange(b, device=dev), elite[:, 0]]
        best_eps = torch.where(better.view(b, *ones), eps_best, best_eps)
        v_best = v0.view(b, k, *s)[torch.arange(b, device=dev), elite[:, 0]]
        best_v = torch.where(better.view(b, *ones), v_best, best_v)
        if cfg.strategy == "cem":
            eps_e = eps.gather(1, elite.view(b, cfg.top, *ones).expand(b, cfg.top, *s))
            a = cfg.alpha
            mu, sigma = mu.clone(), sigma.clone()
            for i in range(b):  # NaN ranks last: a row's finite elites come first
                n = int(torch.isfinite(r_elite[i]).sum())
                if n == 0:
                    continue  # no finite elite: mu and sigma stay
                e = eps_e[i, :n]
                mu[i] = (1 - a) * mu[i] + a * e.mean(0)
                var = e.var(0, unbiased=False)
                spread = var.sqrt() if cfg.per_element else var.mean().sqrt()
                sigma[i] = ((1 - a) * sigma[i] + a * spread).clamp_min(cfg.min_sigma)
    found = torch.isfinite(best_r)
    if cfg.strategy == "best_of" or cfg.use == "best":
        out = torch.where(found.view(b, *ones), best_eps, mu)
    elif cfg.use == "mean":
        out = mu.clone()
    else:
        sig = sigma.view(b, *ones) if not cfg.per_element else sigma
        out = mu + sig * draw((b, 1, *s), cfg.rounds).squeeze(1)
    if cfg.rescale:
        out = rescale_rows(out)
    return SearchResult(
        eps=out,
        mu=mu,
        sigma=sigma,
        best_reward=torch.where(found, best_r, torch.full_like(best_r, float("nan"))),
        rounds=RoundStats(stats[0], stats[1], stats[2], stats[3].long()),
        candidates=cfg.model_calls,
        graphed=False,
        velocity=best_v if cfg.keeps_velocity else None,
    )
