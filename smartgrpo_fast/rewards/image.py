"""Rewards read from the image alone: no prompt, no weights.

* :class:`ShapeAreaReward` (``shape-area``): the share of the image the foreground covers. The
  background colour is the per-channel median of the border pixels (as the analytic judge reads
  it, :mod:`smartgrpo_fast.shapes.judge`); a pixel at RGB distance ``d`` from it counts
  ``clamp((d - low) / (high - low), 0, 1)``: 0 within ``low`` (0.1: the generated images'
  background noise, whose border pixels lie within 0.093 of their median in 9 cases of 10), 1
  beyond ``high`` (0.3: the closest two palette colours are 0.354 apart, so a pixel of any other
  palette colour counts whole). In [0, 1]; a bigger shape scores more. A shape can grow until
  it covers half the border, where the border's median becomes its colour: the reward then
  falls, so it limits itself, but ``max_area`` (default 1: no cap) can stop it sooner.
* :class:`SaturationReward` (``saturation``): the mean HSV saturation ``(max - min) / max`` of
  the pixels (0 where max is 0), in [0, 1].
* :class:`BrightnessReward` (``brightness``): the mean pixel value over the channels, in
  [0, 1].
* :class:`JpegReward` (``jpeg-compressibility``, ``jpeg-incompressibility``): DDPO's rewards
  (Black et al., 2023): minus / plus the size in kB of the image saved as a JPEG of quality 95
  by Pillow (8-bit RGB). Pillow runs on the host, so this reward copies the images to the CPU
  and has no graph-safe ``score``.

All take images (N, 3, H, W) float in [0, 1] and N prompts (only counted), and return (N,)
float32 on the images' device; NaN, out-of-range or misshapen images are an error
(:func:`~smartgrpo_fast.rewards.base.check_images`). ``shape-area`` and ``saturation`` are
:class:`~smartgrpo_fast.rewards.base.PreparedReward`: their ``score`` reads only the images,
so they run inside a captured search round.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch

from smartgrpo_fast.rewards.base import PreparedPrompts, check_images, check_prepared

__all__ = ["BrightnessReward", "JpegReward", "SaturationReward", "ShapeAreaReward"]


def _prepare(prompts: list[str]) -> PreparedPrompts:
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts: expected a list of strings, got {type(prompts).__name__}")
    return PreparedPrompts(tuple(prompts), {})


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


class _ImageOnly:
    """What the graph-safe rewards here share: prompts only counted (``prepare`` makes no
    tensors), ``__call__`` = checks + ``score``, and ``score`` = ``check_prepared`` + the
    subclass's ``_reward(images)``."""

    def prepare(
        self, prompts: list[str], device: torch.device | str | None = None
    ) -> PreparedPrompts:
        """No tensors: the reward reads the images only."""
        return _prepare(prompts)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_images(images, prompts)
        return self.score(images, self.prepare(prompts))

    def score(self, images: torch.Tensor, prepared: PreparedPrompts) -> torch.Tensor:
        """(N,) float32 on the images' device (graph-safe)."""
        check_prepared(images, prepared)
        return self._reward(images)

    def _reward(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class ShapeAreaReward(_ImageOnly):
    """The foreground's share of the image (module docstring).

    Attributes:
        low: RGB distance to the background colour below which a pixel counts 0 (0.1).
        high: the distance from which a pixel counts 1 (0.3); between, linearly.
        max_area: the reward is ``min(area, max_area)`` (1: no cap).
    """

    low: float = 0.1
    high: float = 0.3
    max_area: float = 1.0

    def __post_init__(self) -> None:
        low, high = _number("low", self.low), _number("high", self.high)
        if not 0.0 <= low < high <= math.sqrt(3.0):
            raise ValueError(f"low, high: expected 0 <= low < high <= sqrt(3), got {low}, {high}")
        if not 0.0 < _number("max_area", self.max_area) <= 1.0:
            raise ValueError(f"max_area: expected a value in (0, 1], got {self.max_area!r}")

    def _reward(self, images: torch.Tensor) -> torch.Tensor:
        return self.area(images).clamp_max(self.max_area)

    def area(self, images: torch.Tensor) -> torch.Tensor:
        """(N,) float32: the uncapped foreground share of (N, 3, H, W) images."""
        x = images.float()
        border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=2)
        bg = border.median(dim=2).values[:, :, None, None]
        d = (x - bg).norm(dim=1)
        cover = ((d - self.low) / (self.high - self.low)).clamp(0.0, 1.0)
        return cover.flatten(1).mean(1)


@dataclass(frozen=True)
class SaturationReward(_ImageOnly):
    """Mean HSV saturation of the pixels (module docstring)."""

    def _reward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        hi, lo = x.amax(dim=1), x.amin(dim=1)
        sat = torch.where(hi > 0, (hi - lo) / hi.clamp_min(1e-12), torch.zeros_like(hi))
        return sat.flatten(1).mean(1)


@dataclass(frozen=True)
class BrightnessReward(_ImageOnly):
    """Mean pixel value over the channels (module docstring)."""

    def _reward(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().flatten(1).mean(1)


@dataclass(frozen=True)
class JpegReward:
    """DDPO's JPEG (in)compressibility (module docstring).

    Attributes:
        compressible: True: ``-kB`` (smaller files score more); False: ``+kB``.
        quality: the JPEG quality (95, DDPO's).
    """

    compressible: bool = True
    quality: int = 95

    def __post_init__(self) -> None:
        if not isinstance(self.compressible, bool):
            raise ValueError(f"compressible: expected a bool, got {self.compressible!r}")
        q = self.quality
        if isinstance(q, bool) or not isinstance(q, int) or not 1 <= q <= 100:
            raise ValueError(f"quality: expected an integer in [1, 100], got {q!r}")

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from PIL import Image

        check_images(images, prompts)
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()
        sizes = []
        for p in pixels:
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(p)).save(buf, format="JPEG", quality=self.quality)
            sizes.append(buf.tell() / 1000.0)
        kb = torch.tensor(sizes, dtype=torch.float32, device=images.device)
        return -kb if self.compressible else kb
