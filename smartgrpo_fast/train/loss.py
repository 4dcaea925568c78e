"""GRPO advantages and Flow-GRPO's clipped policy loss (pure functions on tensors)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Advantages", "group_advantages", "policy_terms"]


@dataclass(frozen=True)
class Advantages:
    """Advantages of R rollouts and what was seen computing them.

    Attributes:
        values: (R,) float32, ``(r - mean_group) / (std + 1e-4)`` clipped to +-adv_clip; 0
            for a non-finite reward.
        zero_std_frac: fraction of groups whose finite rewards do not vary (no signal).
        nonfinite: number of non-finite rewards (they get advantage 0 and are left out of
            their group's statistics).
    """

    values: torch.Tensor
    zero_std_frac: float
    nonfinite: int


def group_advantages(
    rewards: torch.Tensor,
    groups: torch.Tensor,
    *,
    adv_clip: float = 5.0,
    global_std: bool = False,
    eps: float = 1e-4,
) -> Advantages:
    """Per-group normalised advantages (Flow-GRPO).

    Args:
        rewards: (R,) float, NaN/inf allowed (advantage 0, counted).
        groups: (R,) int64 group id of each reward (the prompt's global index).
        adv_clip: clip bound (> 0).
        global_std: divide by the std of all finite rewards instead of each group's.
        eps: added to the std.

    The std is the population std (ddof 0), as ``np.std`` in Flow-GRPO.
    """
    if rewards.dim() != 1 or groups.shape != rewards.shape:
        raise ValueError(
            f"rewards, groups: expected two (R,) tensors, got {tuple(rewards.shape)} and "
            f"{tuple(groups.shape)}"
        )
    r = rewards.double()
    finite = torch.isfinite(r)
    ids, inverse = torch.unique(groups, return_inverse=True)
    n_groups = ids.numel()
    zero = torch.zeros(n_groups, dtype=torch.float64, device=r.device)
    rf = torch.where(finite, r, 0.0)
    count = zero.index_add(0, inverse, finite.double())
    mean = zero.index_add(0, inverse, rf) / count.clamp_min(1)
    dev = torch.where(finite, r - mean[inverse], 0.0)
    var = zero.index_add(0, inverse, dev**2) / count.clamp_min(1)
    std = var.sqrt()
    if global_std:
        std_all = r[finite].std(unbiased=False) if bool(finite.any()) else torch.tensor(0.0)
        denom = torch.full_like(std, float(std_all))[inverse]
    else:
        denom = std[inverse]
    adv = torch.where(finite, dev / (denom + eps), 0.0).clamp(-adv_clip, adv_clip)
    no_spread = (std <= 0) | (count < 2)
    return Advantages(
        values=adv.float(),
        zero_std_frac=float(no_spread.double().mean()) if n_groups else 0.0,
        nonfinite=int((~finite).sum()),
    )


def policy_terms(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Flow-GRPO's clipped objective per sample.

    Args:
        log_prob: (n,) float32 with gradient, the policy's log-probability now.
        old_log_prob: (n,) float32, the rollout's.
        advantages: (n,) float32 (already clipped).
        clip_range: the PPO clip ``c``: ratio clamped to [1 - c, 1 + c].

    Returns:
        ``(loss (n,), stats)``: ``loss = max(-A ratio, -A clamp(ratio))`` per sample; stats
        (detached, (n,) each): ``ratio``, ``clipped`` (1.0 where |ratio - 1| > c),
        ``approx_kl`` (``0.5 (logp - logp_old)^2``), ``logp_diff`` (|logp - logp_old|).
    """
    diff = log_prob - old_log_prob
    ratio = torch.exp(diff)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped)
    d = diff.detach()
    stats = {
        "ratio": ratio.detach(),
        "clipped": ((ratio.detach() - 1.0).abs() > clip_range).float(),
        "approx_kl": 0.5 * d**2,
        "logp_diff": d.abs(),
    }
    return loss, stats
