"""Rewards of the embedded model's world: a trained attribute classifier and an analytic one.

* :class:`TinyClassifierReward`: a small CNN trained on the procedural generator predicts the
  shape, the shape's colour and the background colour; the reward of an image for its prompt
  is the mean over the three attributes of the log-probability (``mode="logprob"``, in
  (-inf, 0]) or of the probability (``mode="prob"``, in [0, 1]) of the prompt's value, or the
  log-probability of the least likely one (``mode="min"``: an image is only as good as its
  worst attribute).
* :class:`ColorFidelityReward`: no weights; how well the image is made of the prompt's two
  colours, in the right proportions: ``1 - mean_pixel min(|p - c_shape|, |p - c_bg|) / sqrt(3)``
  minus a penalty when the shape colour covers less than 2% or more than 60% of the image.

Both take images (N, 3, H, W) float in [0, 1] and N prompts, and return (N,) float32. Both
are :class:`~smartgrpo_fast.rewards.base.PreparedReward`: ``prepare`` turns the prompts into
attribute indices (or colours) on the device, ``score`` reads only tensors, so either runs
inside a captured search round.
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
    IMAGE_SIZE,
    SHAPES,
    attributes_from_prompt,
    sample_batch,
)

__all__ = [
    "CLASSIFIER_FILE",
    "ColorFidelityReward",
    "GenerationReport",
    "TinyClassifier",
    "TinyClassifierReward",
    "generation_accuracy",
    "real_image_accuracy",
    "train_classifier",
]

CLASSIFIER_FILE = Path(__file__).resolve().parent / "weights" / "classifier.safetensors"
_PALETTE = torch.tensor(list(COLORS.values()), dtype=torch.float32)
_CACHE_SIZE = 64
_MODES = ("logprob", "prob", "min")


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


def _resize(images: torch.Tensor) -> torch.Tensor:
    if images.shape[-2:] == (IMAGE_SIZE, IMAGE_SIZE):
        return images
    return F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True)


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
                f"{f}: not found (python -m smartgrpo_fast.shapes.reward --out FILE writes it)"
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
        heads = self.classifier(_resize(images.to(self.device, torch.float32)))
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


def _augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Robustness to generated images: random blur and Gaussian noise."""
    n = images.shape[0]
    blur = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    w = torch.rand(n, 1, 1, 1, generator=gen) * 0.7
    noisy = (1 - w) * images + w * blur
    sigma = torch.rand(n, 1, 1, 1, generator=gen) * 0.12
    return (noisy + sigma * torch.randn(noisy.shape, generator=gen)).clamp(0, 1)


def train_classifier(
    *, steps: int = 1500, batch: int = 64, lr: float = 2e-3, seed: int = 0, log=print
) -> TinyClassifier:
    """Train the attribute classifier on freshly generated images (deterministic from seed)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = TinyClassifier()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        images, attrs = sample_batch(batch, gen)
        logits = net(_augment(images, gen))
        loss = sum(
            F.cross_entropy(lg, t)
            for lg, t in zip(logits, (attrs.shape, attrs.color, attrs.background), strict=True)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"classifier step {step:5d}  loss {float(loss.detach()):.4f}")
    return net.eval()


def main(argv: list[str] | None = None) -> int:
    """``python -m smartgrpo_fast.shapes.reward``: train the classifier and save it."""
    import argparse
    import time

    from safetensors.torch import save_file

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=CLASSIFIER_FILE)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()
    net = train_classifier(steps=args.steps, seed=args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(torch.float16).contiguous() for k, v in net.state_dict().items()}
    save_file(state, args.out, metadata={"seed": str(args.seed), "steps": str(args.steps)})
    print(f"saved {args.out} after {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


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
    from smartgrpo_fast.sde import sample_ode
    from smartgrpo_fast.shapes.data import sample_prompts

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
    from smartgrpo_fast.shapes.data import prompt_of

    images, attrs = sample_batch(n, torch.Generator().manual_seed(seed))
    prompts = [
        prompt_of(int(s), int(c), int(b))
        for s, c, b in zip(attrs.shape, attrs.color, attrs.background, strict=True)
    ]
    return float(reward.matches(images, prompts).all(dim=1).float().mean())
