"""Rewards of the embedded model's world: a trained attribute classifier and an analytic one.

* :class:`TinyClassifierReward`: a small CNN trained on the procedural generator predicts the
  shape, the shape's colour and the background colour; the reward of an image for its prompt
  is the mean over the three attributes of the log-probability (``mode="logprob"``, in
  (-inf, 0]) or of the probability (``mode="prob"``, in [0, 1]) of the prompt's value, or the
  log-probability of the least likely one (``mode="min"``: an image is only as good as its
  worst attribute), or the mean over the attributes of the logit margin of the prompt's value
  over the best other value (``mode="margin"``: > 0 exactly where the attribute is read right,
  and unbounded above, so candidates that all read right still rank by how clearly).
* :class:`ColorFidelityReward`: no weights; how well the image is made of the prompt's two
  colours, in the right proportions: ``1 - mean_pixel min(|p - c_shape|, |p - c_bg|) / sqrt(3)``
  minus a penalty when the shape colour covers less than 2% or more than 60% of the image.

Both take images (N, 3, H, W) float in [0, 1] and N prompts, and return (N,) float32. Both
are :class:`~smartgrpo_fast.rewards.base.PreparedReward`: ``prepare`` turns the prompts into
attribute indices (or colours) on the device, ``score`` reads only tensors, so either runs
inside a captured search round.

``smartgrpo_fast.rewards.load("tiny")`` (and ``tiny-prob``, ``tiny-min``, ``tiny-margin``,
``tiny-color``)
returns these. This module imports only the world's data (:mod:`.data`) and the reward
protocol: loading a reward never imports the flow model or the sampler. The classifier is
trained by :mod:`.train_reward`; generated images are judged by :mod:`.evaluate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from smartgrpo_fast.rewards.base import PreparedPrompts, check_images, check_prepared
from smartgrpo_fast.shapes.data import (
    COLORS,
    SHAPES,
    WEIGHTS_DIR,
    attributes_from_prompt,
    resize,
)

__all__ = ["CLASSIFIER_FILE", "ColorFidelityReward", "TinyClassifier", "TinyClassifierReward"]

CLASSIFIER_FILE = WEIGHTS_DIR / "classifier.safetensors"
_PALETTE = torch.tensor(list(COLORS.values()), dtype=torch.float32)
_CACHE_SIZE = 64
_MODES = ("logprob", "prob", "min", "margin")


class TinyClassifier(nn.Module):
    """CNN: images (N, 3, 32, 32) in [0, 1] -> logits of shape (4), colour (8), background (8).

    A fourth input channel is the distance of each pixel to the background colour (the median
    of the border pixels): a colour-independent foreground mask, from which the shape head
    learns in ~1500 steps (RGB alone stayed near 50% shape accuracy after 400).
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(4, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(4 * w, 4 * w, 3, padding=1), nn.SiLU(),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.heads = nn.Linear(4 * w, len(SHAPES) + 2 * len(COLORS))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        border = torch.cat(
            [images[:, :, 0], images[:, :, -1], images[:, :, :, 0], images[:, :, :, -1]], dim=2
        )
        background = border.median(dim=2).values[:, :, None, None]
        mask = (images - background).norm(dim=1, keepdim=True)
        logits = self.heads(self.features(torch.cat([images, mask], dim=1) * 2.0 - 1.0))
        s, c = len(SHAPES), len(COLORS)
        return logits[:, :s], logits[:, s : s + c], logits[:, s + c :]


def _targets(prompts: list[str], device: torch.device, cache: dict) -> torch.Tensor:
    """(N, 3) attribute indices of the prompts on ``device``, kept in ``cache`` so that a
    repeated call (a search round replayed as a CUDA graph) makes no host-to-device copy."""
    key = (tuple(prompts), str(device))
    hit = cache.get(key)
    if hit is None:
        if len(cache) >= _CACHE_SIZE:
            cache.pop(next(iter(cache)))
        hit = cache[key] = torch.tensor([attributes_from_prompt(p) for p in prompts], device=device)
    return hit


def _margin(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N,) logit of ``target`` (N,) int64 minus the largest other logit of ``logits`` (N, C)."""
    idx = target.unsqueeze(1)
    others = logits.float().scatter(1, idx, float("-inf"))
    return logits.float().gather(1, idx).squeeze(1) - others.amax(dim=1)


@dataclass
class TinyClassifierReward:
    """Prompt-matching reward from the embedded attribute classifier (see module docstring)."""

    classifier: TinyClassifier
    mode: str = "logprob"
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"mode: expected one of {', '.join(_MODES)}, got {self.mode!r}")
        self.classifier.eval().requires_grad_(False)

    @classmethod
    def load(cls, path: str | Path | None = None, *, mode: str = "logprob",
             device: torch.device | str = "cpu") -> TinyClassifierReward:  # fmt: skip
        """The shipped classifier (``path=None``) or a safetensors file from train_classifier."""
        from safetensors.torch import load_file

        f = Path(path) if path is not None else CLASSIFIER_FILE
        if not f.is_file():
            raise FileNotFoundError(
                f"{f}: not found "
                "(python -m smartgrpo_fast.shapes.train_reward --out FILE writes it)"
            )
        net = TinyClassifier()
        net.load_state_dict({k: v.float() for k, v in load_file(f).items()})
        return cls(net.to(device), mode)

    @property
    def device(self) -> torch.device:
        return next(self.classifier.parameters()).device

    def prepare(
        self, prompts: list[str], device: torch.device | str | None = None
    ) -> PreparedPrompts:
        """``targets``: the prompts' (N, 3) int64 attribute indices on the classifier's device
        (where scoring runs, whatever ``device``)."""
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts: expected a list of strings, got {type(prompts).__name__}")
        return PreparedPrompts(
            tuple(prompts), {"targets": _targets(list(prompts), self.device, self._cache)}
        )

    @torch.no_grad()
    def _heads(self, images: torch.Tensor, prepared: PreparedPrompts) -> tuple[tuple, torch.Tensor]:
        """The classifier's three logit heads and the prompts' (N, 3) attribute indices."""
        check_prepared(images, prepared)
        heads = self.classifier(resize(images.to(self.device, torch.float32)))
        return heads, prepared.tensors["targets"]

    def _log_probs(self, images: torch.Tensor, prepared: PreparedPrompts) -> torch.Tensor:
        heads, tgt = self._heads(images, prepared)
        cols = [F.log_softmax(h, dim=1).gather(1, tgt[:, i : i + 1]) for i, h in enumerate(heads)]
        return torch.cat(cols, dim=1)

    def attribute_log_probs(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(N, 3) log-probabilities of the prompts' (shape, colour, background)."""
        check_images(images, prompts)
        return self._log_probs(images, self.prepare(prompts))

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_images(images, prompts)
        return self.score(images, self.prepare(prompts))

    def score(self, images: torch.Tensor, prepared: PreparedPrompts) -> torch.Tensor:
        """(N,) float32 on the images' device; reads no prompt strings (graph-safe)."""
        if self.mode == "margin":
            heads, tgt = self._heads(images, prepared)
            margins = [_margin(h, tgt[:, i]) for i, h in enumerate(heads)]
            return torch.stack(margins, dim=1).mean(dim=1).float().to(images.device)
        lp = self._log_probs(images, prepared)
        if self.mode == "logprob":
            out = lp.mean(dim=1)
        elif self.mode == "prob":
            out = lp.exp().mean(dim=1)
        else:  # min: the least likely attribute decides
            out = lp.min(dim=1).values
        return out.float().to(images.device)

    def matches(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(N, 3) bool: does the arg-max of each head equal the prompt's attribute."""
        check_images(images, prompts)
        heads, tgt = self._heads(images, self.prepare(prompts))
        return torch.stack([h.argmax(1) == tgt[:, i] for i, h in enumerate(heads)], dim=1)


@dataclass(frozen=True)
class ColorFidelityReward:
    """Analytic colour reward (see module docstring); needs no weights."""

    min_cover: float = 0.02
    max_cover: float = 0.6
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def prepare(
        self, prompts: list[str], device: torch.device | str | None = None
    ) -> PreparedPrompts:
        """``fg`` and ``bg``: the prompts' shape and background colours, (N, 3) float32 on
        ``device`` (default CPU; score it on images of that device to stay graph-safe)."""
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts: expected a list of strings, got {type(prompts).__name__}")
        dev = torch.device("cpu" if device is None else device)
        attrs = _targets(list(prompts), dev, self._cache)
        pal = self._cache.get(dev)
        if pal is None:
            pal = self._cache[dev] = _PALETTE.to(dev)
        return PreparedPrompts(tuple(prompts), {"fg": pal[attrs[:, 1]], "bg": pal[attrs[:, 2]]})

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_images(images, prompts)
        return self.score(images, self.prepare(prompts, images.device))

    def score(self, images: torch.Tensor, prepared: PreparedPrompts) -> torch.Tensor:
        """(N,) float32 on the images' device; reads no prompt strings (graph-safe)."""
        check_prepared(images, prepared)
        img = images.float()
        fg = prepared.tensors["fg"].to(img.device).view(-1, 3, 1, 1)
        bg = prepared.tensors["bg"].to(img.device).view(-1, 3, 1, 1)
        d_fg = (img - fg).norm(dim=1)
        d_bg = (img - bg).norm(dim=1)
        fidelity = 1.0 - torch.minimum(d_fg, d_bg).flatten(1).mean(1) / math.sqrt(3.0)
        cover = (d_fg < d_bg).float().flatten(1).mean(1)
        penalty = (self.min_cover - cover).clamp_min(0) / self.min_cover
        penalty = penalty + (cover - self.max_cover).clamp_min(0) / (1 - self.max_cover)
        return (fidelity - 0.5 * penalty).float()
