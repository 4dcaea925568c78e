"""How well images match their prompts in the embedded world, judged by the classifier.

* :func:`generation_accuracy`: sample a flow model (ODE, through :mod:`smartgrpo_fast.sde`)
  on fresh prompts and count the images whose three attributes the classifier reads as the
  prompt's — how the shipped flow model's guidance scale was chosen.
* :func:`real_image_accuracy`: the same count on rendered images: the classifier's own
  accuracy.

This is the one module of the world that samples a flow model, so the rewards
(:mod:`.reward`) stay free of the sampler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from smartgrpo_fast.sde import sample_ode
from smartgrpo_fast.shapes.data import sample_batch, sample_prompts
from smartgrpo_fast.shapes.reward import TinyClassifierReward

__all__ = ["GenerationReport", "generation_accuracy", "real_image_accuracy"]


@dataclass(frozen=True)
class GenerationReport:
    """How often generated images match their prompts, per attribute and all three."""

    n: int
    shape: float
    color: float
    background: float
    all_three: float


@torch.no_grad()
def generation_accuracy(
    model, reward: TinyClassifierReward, *, n: int = 256, seed: int = 0, steps: int = 40,
    batch: int = 64,
) -> GenerationReport:  # fmt: skip
    """Sample n prompts, generate one image each (``steps``-step ODE from seeded noise), and
    report the fraction whose classifier arg-max matches the prompt's attributes."""
    prompts = sample_prompts(n, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    hits = []
    for i in range(0, n, batch):
        chunk = prompts[i : i + batch]
        z = torch.randn((len(chunk), *model.latent_shape), generator=gen).to(model.device)
        x0 = sample_ode(model, model.encode_prompts(chunk), z, steps=steps)
        hits.append(reward.matches(model.decode(x0), chunk).cpu())
    m = torch.cat(hits).float()
    return GenerationReport(
        n, float(m[:, 0].mean()), float(m[:, 1].mean()), float(m[:, 2].mean()),
        float(m.all(dim=1).float().mean()),
    )  # fmt: skip


@torch.no_grad()
def real_image_accuracy(reward: TinyClassifierReward, *, n: int = 1024, seed: int = 1) -> float:
    """Fraction of fresh procedural images whose three attributes the classifier gets right."""
    images, attrs = sample_batch(n, torch.Generator().manual_seed(seed))
    return float(reward.matches(images, attrs.prompts()).all(dim=1).float().mean())
