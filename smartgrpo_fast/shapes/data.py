"""The procedural world of the embedded model: one coloured shape on a coloured background.

An image is 32x32 RGB: a shape (circle, square, triangle, cross) of one colour at a random
position and size on a background of another colour, rendered with 4x4 supersampled
anti-aliasing. Its prompt names the three attributes: ``"a red circle on a blue background"``;
:func:`tokenize` turns prompts into ids over the world's :data:`VOCAB`. Everything is a pure
function of a seed (torch.Generator); nothing is downloaded. The trained weights of the flow
model and of the classifier ship in :data:`WEIGHTS_DIR`.

This module imports only torch: the rewards (:mod:`.reward`) build on it without the flow
model or the sampler.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = [
    "COLORS",
    "IMAGE_SIZE",
    "PROMPT_WORDS",
    "SHAPES",
    "VOCAB",
    "WEIGHTS_DIR",
    "Attributes",
    "attributes_from_prompt",
    "check_prompts",
    "prompt_of",
    "render",
    "resize",
    "sample_attributes",
    "sample_batch",
    "sample_prompts",
    "shape_mask",
    "tokenize",
]

IMAGE_SIZE = 32
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
#: Colour names and their RGB values in [0, 1].
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.1, 0.1),
    "green": (0.1, 0.7, 0.2),
    "blue": (0.1, 0.25, 0.85),
    "yellow": (0.95, 0.85, 0.1),
    "purple": (0.55, 0.15, 0.7),
    "orange": (0.95, 0.5, 0.05),
    "white": (0.95, 0.95, 0.95),
    "black": (0.05, 0.05, 0.05),
}
_COLOR_NAMES = tuple(COLORS)
_SUPERSAMPLE = 4
#: The words of the world's prompts; id 0, ``<pad>``, is the null prompt of guidance.
VOCAB: tuple[str, ...] = ("<pad>", "a", "an", "on", "background", *SHAPES, *COLORS)
PROMPT_WORDS = 7
#: The shipped weights: the flow model's config.json and safetensors, the classifier's.
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class Attributes:
    """Indices of a batch's attributes, each (N,) int64: into SHAPES, COLORS, COLORS."""

    shape: torch.Tensor
    color: torch.Tensor
    background: torch.Tensor

    def __len__(self) -> int:
        return int(self.shape.shape[0])

    def prompts(self) -> list[str]:
        """The prompt of each triple (:func:`prompt_of`)."""
        return [
            prompt_of(int(s), int(c), int(b))
            for s, c, b in zip(self.shape, self.color, self.background, strict=True)
        ]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def prompt_of(shape: int, color: int, background: int) -> str:
    """``"a {color} {shape} on a {background} background"`` ("an" before a vowel)."""
    c, b = _COLOR_NAMES[color], _COLOR_NAMES[background]
    return f"{_article(c)} {c} {SHAPES[shape]} on {_article(b)} {b} background"


def attributes_from_prompt(prompt: str) -> tuple[int, int, int]:
    """(shape, color, background) indices of a prompt made by :func:`prompt_of`."""
    words = prompt.strip().lower().split()
    if (
        len(words) != 7
        or words[0] not in ("a", "an")
        or words[3] != "on"
        or words[4] not in ("a", "an")
        or words[6] != "background"
        or words[1] not in COLORS
        or words[2] not in SHAPES
        or words[5] not in COLORS
    ):
        raise ValueError(
            f"prompt: expected 'a <color> <shape> on a <color> background' with color in "
            f"{', '.join(_COLOR_NAMES)} and shape in {', '.join(SHAPES)}, got {prompt!r}"
        )
    return SHAPES.index(words[2]), _COLOR_NAMES.index(words[1]), _COLOR_NAMES.index(words[5])


def check_prompts(prompts: list[str], *, reader: str, grammar: bool = True) -> None:
    """Every prompt is one the embedded world reads; else a ValueError starting ``prompts:``
    that names ``reader`` (who reads them), the first bad prompt and its index.

    ``grammar=True``: ``a <color> <shape> on a <color> background`` (what its rewards parse);
    ``False``: any 7 words of :data:`VOCAB` (what its text encoder reads).
    """
    for i, p in enumerate(prompts):
        try:
            if grammar:
                attributes_from_prompt(p)
            else:
                tokenize([p])
        except ValueError:
            form = "'a <color> <shape> on a <color> background'" if grammar else "7 words"
            raise ValueError(
                f"prompts: {reader} reads embedded-world prompts, {form} over the words "
                f"{', '.join(VOCAB[1:])}; prompt {i} is {p!r}"
            ) from None


def tokenize(prompts: list[str]) -> torch.Tensor:
    """(B, 7) int64 word ids; a word outside the vocabulary is a ValueError naming it."""
    ids = []
    for p in prompts:
        words = p.strip().lower().split()
        unknown = [w for w in words if w not in VOCAB]
        if unknown or len(words) != PROMPT_WORDS:
            raise ValueError(
                f"prompts: the embedded model reads 7-word prompts like 'a red circle on a blue "
                f"background' over the words {', '.join(VOCAB[1:])}; got {p!r}"
                + (f" (unknown: {', '.join(unknown)})" if unknown else "")
            )
        ids.append([VOCAB.index(w) for w in words])
    return torch.tensor(ids, dtype=torch.int64)


def sample_attributes(n: int, generator: torch.Generator) -> Attributes:
    """n random attribute triples; the shape's colour always differs from the background."""
    shape = torch.randint(len(SHAPES), (n,), generator=generator)
    color = torch.randint(len(COLORS), (n,), generator=generator)
    offset = torch.randint(1, len(COLORS), (n,), generator=generator)
    return Attributes(shape, color, (color + offset) % len(COLORS))


def sample_prompts(n: int, seed: int = 0) -> list[str]:
    """n valid prompts of the embedded model, deterministic from ``seed``."""
    return sample_attributes(n, torch.Generator().manual_seed(seed)).prompts()


def shape_mask(shape: int, cx: torch.Tensor, cy: torch.Tensor, r: torch.Tensor,
               size: int) -> torch.Tensor:  # fmt: skip
    """(N, size, size) bool: which points of a size x size grid over the 32 x 32 image lie in
    the shape ``SHAPES[shape]`` of centre (cx, cy) and radius r (each (N,), pixel units)."""
    coords = (torch.arange(size, dtype=torch.float32, device=cx.device) + 0.5) / size * IMAGE_SIZE
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    dx = x[None] - cx[:, None, None]
    dy = y[None] - cy[:, None, None]
    r = r[:, None, None]
    if SHAPES[shape] == "circle":
        return dx.square() + dy.square() <= r.square()
    if SHAPES[shape] == "square":
        return torch.maximum(dx.abs(), dy.abs()) <= 0.8 * r
    if SHAPES[shape] == "triangle":  # upward: base at cy + 0.7 r, apex at cy - r
        return (dy <= 0.7 * r) & (2.0 * dx.abs() <= (dy + r) * 1.0)
    arm = 0.33 * r  # the cross
    return ((dx.abs() <= arm) & (dy.abs() <= r)) | ((dy.abs() <= arm) & (dx.abs() <= r))


def _masks(shape: torch.Tensor, cx, cy, r, size: int) -> torch.Tensor:
    """(N, size, size) float coverage of each shape on a size x size grid (pixel units)."""
    each = [shape_mask(s, cx, cy, r, size) for s in range(len(SHAPES))]
    masks = torch.stack(each, dim=1).float()  # (N, 4, S, S)
    return masks.gather(1, shape.view(-1, 1, 1, 1).expand(-1, 1, size, size))[:, 0]


def render(attrs: Attributes, generator: torch.Generator) -> torch.Tensor:
    """Images (N, 3, 32, 32) float32 in [0, 1] for ``attrs``; position and size random."""
    n = len(attrs)
    r = 5.0 + 6.0 * torch.rand(n, generator=generator)  # radius 5..11 px
    margin = r + 1.0
    cx = margin + (IMAGE_SIZE - 2 * margin) * torch.rand(n, generator=generator)
    cy = margin + (IMAGE_SIZE - 2 * margin) * torch.rand(n, generator=generator)
    fine = _masks(attrs.shape, cx, cy, r, IMAGE_SIZE * _SUPERSAMPLE)
    cover = F.avg_pool2d(fine[:, None], _SUPERSAMPLE)  # (N, 1, 32, 32) anti-aliased
    palette = torch.tensor(list(COLORS.values()), dtype=torch.float32)
    fg = palette[attrs.color].view(n, 3, 1, 1)
    bg = palette[attrs.background].view(n, 3, 1, 1)
    return cover * fg + (1.0 - cover) * bg


def resize(images: torch.Tensor) -> torch.Tensor:
    """Images (N, C, H, W) at the world's 32 x 32 (bilinear, antialiased); 32 x 32 unchanged."""
    if images.shape[-2:] == (IMAGE_SIZE, IMAGE_SIZE):
        return images
    return F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True)


def sample_batch(n: int, generator: torch.Generator) -> tuple[torch.Tensor, Attributes]:
    """n (image, attributes) pairs: images (n, 3, 32, 32) in [0, 1]."""
    attrs = sample_attributes(n, generator)
    return render(attrs, generator), attrs
