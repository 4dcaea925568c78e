"""How well images match their prompts in the embedded world, judged by the classifier or
by the analytic judge (:mod:`.judge`), anything with ``matches(images, prompts)``.

* :func:`generation_accuracy`: sample a flow model (ODE, through :mod:`smartgrpo_fast.sde`)
  on fresh prompts and count the images whose three attributes the judge reads as the
  prompt's — how the shipped flow model's guidance scale was chosen (by the classifier);
  :func:`generation_matches` gives several judges' verdicts on the same images.
* :func:`real_image_accuracy`: the same count on rendered images: the judge's own accuracy.

This is the one module of the world that samples a flow model, so the rewards
(:mod:`.reward`) stay free of the sampler.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from smartgrpo_fast.sde import sample_ode
from smartgrpo_fast.shapes.data import sample_batch, sample_prompts

__all__ = ["GenerationReport", "Judge", "generation_accuracy", "generation_matches",
           "real_image_accuracy"]  # fmt: skip


class Judge(Protocol):
    """What reads whether images show their prompts: the classifier reward
    (:class:`~.reward.TinyClassifierReward`) or the analytic :class:`~.judge.ShapesJudge`."""

    def matches(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(N, 3) bool: shape, colour, background as the prompt says."""
        ...


@dataclass(frozen=True)
class GenerationReport:
    """How often generated images match their prompts, per attribute and all three."""

    n: int
    shape: float
    color: float
    background: float
    all_three: float

    @classmethod
    def from_matches(cls, matches: torch.Tensor) -> GenerationReport:
        """The report of (n, 3) bool matches (shape, colour, background), as ``matches`` gives."""
        m = matches.float()
        return cls(
            int(m.shape[0]), float(m[:, 0].mean()), float(m[:, 1].mean()),
            float(m[:, 2].mean()), float(m.all(dim=1).float().mean()),
        )  # fmt: skip


@torch.no_grad()
def generation_matches(
    model, judges: Sequence[Judge], *, n: int = 256, seed: int = 0, steps: int = 40,
    batch: int = 64,
) -> list[torch.Tensor]:  # fmt: skip
    """Sample n prompts, generate one image each (``steps``-step ODE from seeded noise), and
    return each judge's (n, 3) bool ``matches`` of the same images, on the CPU."""
    prompts = sample_prompts(n, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    hits: list[list[torch.Tensor]] = [[] for _ in judges]
    for i in range(0, n, batch):
        chunk = prompts[i : i + batch]
        z = torch.randn((len(chunk), *model.latent_shape), generator=gen).to(model.device)
        images = model.decode(sample_ode(model, model.encode_prompts(chunk), z, steps=steps))
        for judge, out in zip(judges, hits, strict=True):
            out.append(judge.matches(images, chunk).cpu())
    return [torch.cat(out) for out in hits]


def generation_accuracy(
    model, reward: Judge, *, n: int = 256, seed: int = 0, steps: int = 40, batch: int = 64
) -> GenerationReport:
    """The fraction of n generated images (:func:`generation_matches`) whose attributes
    ``reward`` (the classifier, or the analytic judge) reads as their prompt's."""
    (matches,) = generation_matches(model, [reward], n=n, seed=seed, steps=steps, batch=batch)
    return GenerationReport.from_matches(matches)


@torch.no_grad()
def real_image_accuracy(reward: Judge, *, n: int = 1024, seed: int = 1) -> float:
    """Fraction of fresh procedural images whose three attributes the classifier gets right."""
    images, attrs = sample_batch(n, torch.Generator().manual_seed(seed))
    return float(reward.matches(images, attrs.prompts()).all(dim=1).float().mean())
