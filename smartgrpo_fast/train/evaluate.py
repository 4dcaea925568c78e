"""Evaluation of a flow model (or its LoRA adapter) on held-out prompts: ODE samples from fixed
noise, scored by a reward.

Image ``j`` of prompt ``i`` starts from the initial noise ``x_T`` = element ``(i, j)`` of
``philox_normal((N, M, *latent_shape), seed=config.seed, round=0)`` (M =
``config.images_per_prompt``): the noise is keyed by the prompt's index in the list and the
image's index, so the batch size never changes the result, two models evaluated with the same
prompts and seed start from the same noise (a paired comparison), and image 0 of every prompt
is the same with any M. Image 0 is the ``x_T`` :func:`~smartgrpo_fast.search.compare_noise`
draws with that seed. With M > 1 a prompt's reward is the mean of its M images' (GenEval's
protocol samples 4 images per prompt): a paired comparison then measures the change of each
prompt's expected reward rather than of one trajectory, which a small change of the weights
can flip between a right and a wrong image.

``smartgrpo-fast eval`` (see its ``--help``) is the command line over :func:`evaluate`; the
trainer calls it every ``eval.every`` steps and writes :func:`save_grid` of the images.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from smartgrpo_fast.models.base import decode_latents
from smartgrpo_fast.ops import philox_normal
from smartgrpo_fast.rewards.base import Reward
from smartgrpo_fast.sde import check_time_shift, flow_sigmas, integrate_ode, schedule_shift
from smartgrpo_fast.search.report import _finite
from smartgrpo_fast.search.rollout import paired_stats

__all__ = [
    "EvalConfig", "EvalResult", "evaluate", "paired_comparison", "result_dict", "reward_labels",
    "save_grid",
]  # fmt: skip


@dataclass(frozen=True)
class EvalConfig:
    """How the eval set is sampled.

    Attributes:
        steps: Euler steps of the ODE from t = 1 to 0 (20).
        seed: keys the initial noise (Philox, round 0, row = prompt index, candidate = image
            index).
        batch: images sampled together (one decode); does not change the result.
        shift: the schedule's time shift; None = the model's (``sde.schedule_shift``).
        images_per_prompt: M images of each prompt, from M noises; a prompt's reward is their
            mean (1: one image, the default).
    """

    steps: int = 20
    seed: int = 0
    batch: int = 32
    shift: float | None = None
    images_per_prompt: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps: expected an integer >= 1, got {self.steps!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed: expected an integer, got {self.seed!r}")
        if not 0 <= self.seed < 2**62:
            raise ValueError(f"seed: expected 0 <= seed < 2**62, got {self.seed}")
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise ValueError(f"batch: expected an integer >= 1, got {self.batch!r}")
        m = self.images_per_prompt
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"images_per_prompt: expected an integer >= 1, got {m!r}")
        if self.shift is not None:
            check_time_shift(self.shift)


@dataclass(frozen=True, eq=False)
class EvalResult:
    """What :func:`evaluate` measured, in prompt order, on the CPU.

    With M images per prompt the per-image tensors are prompt-major, like diffusers'
    ``num_images_per_prompt`` outputs: rows ``i*M .. i*M + M - 1`` belong to prompt ``i``.

    Attributes:
        prompts: the N prompts.
        rewards: (N,) float32, each prompt's mean image reward; NaN where one of its image
            rewards was not finite (NaN or inf).
        images: (N*M, 3, H, W) float32 in [0, 1].
        matches: (N*M,) bool, all of the prompt's attributes recognised in the image (rewards
            with a ``matches(images, prompts) -> (N, A) bool`` method, like the embedded
            ``tiny`` rewards), else None.
        seconds: wall time of the evaluation.
        shift: the schedule's time shift used.
        image_rewards: (N*M,) float32, every image's reward (NaN where not finite); None
            means ``rewards`` (M = 1).
    """

    prompts: list[str]
    rewards: torch.Tensor
    images: torch.Tensor
    matches: torch.Tensor | None
    seconds: float
    shift: float
    image_rewards: torch.Tensor | None = None

    @property
    def images_per_prompt(self) -> int:
        """M, the images sampled of each prompt."""
        return self.images.shape[0] // max(1, len(self.prompts))

    @property
    def grid_nrow(self) -> int:
        """Images per row of a grid of :attr:`images` that keeps each prompt's on one row:
        8, or the largest multiple of M up to 8 (M when M > 8)."""
        m = self.images_per_prompt
        return m * max(1, 8 // m)

    @property
    def nonfinite(self) -> int:
        """How many prompts' rewards were NaN or inf (excluded from :attr:`mean` and
        :attr:`std`): those with a non-finite image reward."""
        return int((~torch.isfinite(self.rewards)).sum())

    @property
    def mean(self) -> float:
        """Mean of the finite rewards (NaN when none is)."""
        r = self.rewards[torch.isfinite(self.rewards)].double()
        return float(r.mean()) if r.numel() else float("nan")

    @property
    def std(self) -> float:
        """Standard deviation (ddof 1) of the finite rewards (NaN with fewer than two)."""
        r = self.rewards[torch.isfinite(self.rewards)].double()
        return float(r.std()) if r.numel() > 1 else float("nan")

    @property
    def match_rate(self) -> float | None:
        """Fraction of images that matched all their prompt's attributes; None without
        matches."""
        return None if self.matches is None else float(self.matches.double().mean())

    def summary(self) -> dict[str, Any]:
        """``{"n", "mean", "std", "nonfinite", "match_rate", "seconds"}`` (floats, JSON-ready
        except that NaN stays NaN)."""
        return {"n": len(self.prompts), "mean": self.mean, "std": self.std,
                "nonfinite": self.nonfinite, "match_rate": self.match_rate,
                "seconds": self.seconds}  # fmt: skip


def _check_prompts(prompts: Any) -> list[str]:
    if isinstance(prompts, str) or not isinstance(prompts, list | tuple) or not prompts:
        raise TypeError(f"prompts: expected a non-empty list of strings, got {prompts!r:.80}")
    if bad := [p for p in prompts if not isinstance(p, str)]:
        raise TypeError(f"prompts: expected strings, got {type(bad[0]).__name__} {bad[0]!r:.60}")
    return list(prompts)


def _all_matched(m: Any, n: int) -> torch.Tensor:
    """(N,) bool from a reward's ``matches`` output: (N, A) bool (all attributes) or (N,)."""
    if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or m.dim() not in (1, 2) \
            or m.shape[0] != n:  # fmt: skip
        got = f"{tuple(m.shape)} {m.dtype}" if isinstance(m, torch.Tensor) else type(m).__name__
        raise ValueError(f"reward.matches: expected an ({n}, A) or ({n},) bool tensor, got {got}")
    return (m.all(dim=1) if m.dim() == 2 else m).cpu()


@torch.no_grad()
def evaluate(
    model: Any,
    reward: Reward,
    prompts: list[str],
    config: EvalConfig | None = None,
    *,
    progress: bool = False,
) -> EvalResult:
    """Sample every prompt with the ODE from its fixed initial noise and score the images.

    Args:
        model: a :class:`~smartgrpo_fast.models.FlowModel`.
        reward: ``reward(images, prompts) -> (N,)``; its ``matches`` method, when it has one,
            gives :attr:`EvalResult.matches`.
        prompts: the N prompts; image j of prompt i always gets noise (i, j) (module
            docstring).
        config: steps, seed, batch, shift, images per prompt (default :class:`EvalConfig()`).
        progress: a progress bar over the batches (stderr).

    Non-finite rewards are kept as NaN in :attr:`EvalResult.rewards` (a prompt with one
    non-finite image reward gets NaN), counted (:attr:`EvalResult.nonfinite`) and left out of
    the mean, with a RuntimeWarning.
    ``model.transformer`` (when it is a module) runs in eval mode (LoRA dropout off) and gets
    its mode back afterwards, so an evaluation in the middle of training is deterministic.
    """
    config = config or EvalConfig()
    if not isinstance(config, EvalConfig):
        raise TypeError(f"config: expected an EvalConfig, got {type(config).__name__}")
    prompts = _check_prompts(prompts)
    module = getattr(model, "transformer", None)
    training = isinstance(module, torch.nn.Module) and module.training
    if training:
        module.eval()
    try:
        return _evaluate(model, reward, prompts, config, progress)
    finally:
        if training:
            module.train()


def _evaluate(
    model: Any, reward: Reward, prompts: list[str], config: EvalConfig, progress: bool
) -> EvalResult:
    t0 = time.perf_counter()
    shift = schedule_shift(model) if config.shift is None else config.shift
    sigmas = flow_sigmas(config.steps, shift).tolist()
    n, m, shape = len(prompts), config.images_per_prompt, tuple(model.latent_shape)
    dev = torch.device(getattr(model, "device", "cpu"))
    x_t = philox_normal((n, m, *shape), seed=config.seed, round=0).flatten(0, 1)
    rows = [p for p in prompts for _ in range(m)]  # prompt-major, like x_t
    has_matches = callable(getattr(reward, "matches", None))
    rewards, images, matches = [], [], []
    chunks = range(0, n * m, config.batch)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="eval", unit="batch")
    for start in chunks:
        chunk = rows[start : start + config.batch]
        cond = model.encode_prompts(chunk)
        x0 = integrate_ode(model, cond, x_t[start : start + len(chunk)].to(dev), sigmas)
        img = decode_latents(model, x0)
        r = reward(img, chunk)
        if not isinstance(r, torch.Tensor) or r.shape != (len(chunk),):
            got = tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
            raise ValueError(f"reward: expected ({len(chunk)},) rewards, got {got}")
        rewards.append(r.detach().float().cpu())
        images.append(img.detach().float().cpu())
        if has_matches:
            matches.append(_all_matched(reward.matches(img, chunk), len(chunk)))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    r = torch.cat(rewards)
    r = torch.where(torch.isfinite(r), r, torch.full_like(r, float("nan")))
    per_prompt = r.view(n, m).mean(dim=1)  # NaN when one of the prompt's images is
    result = EvalResult(prompts=prompts, rewards=per_prompt, images=torch.cat(images),
                        matches=torch.cat(matches) if has_matches else None,
                        seconds=time.perf_counter() - t0, shift=shift,
                        image_rewards=r if m > 1 else None)  # fmt: skip
    if result.nonfinite:
        bad = int(r.isnan().sum())
        what = f" ({bad} of {n * m} images)" if m > 1 else ""
        warnings.warn(
            f"evaluate: {result.nonfinite} of {n} rewards are not finite{what} (NaN in "
            "rewards); left out of the mean",
            RuntimeWarning,
            stacklevel=3,
        )
    return result


@torch.no_grad()
def rescore(res: EvalResult, reward: Reward, *, batch: int = 32) -> EvalResult:
    """``res``'s images scored by another reward (a judge), in batches of ``batch`` images:
    the same prompts, images and per-prompt averaging, the other reward's values and
    ``matches``."""
    t0 = time.perf_counter()
    m = res.images_per_prompt
    rows = [p for p in res.prompts for _ in range(m)]
    has_matches = callable(getattr(reward, "matches", None))
    scores, matches = [], []
    for lo in range(0, len(rows), batch):
        img, chunk = res.images[lo : lo + batch], rows[lo : lo + batch]
        scores.append(reward(img, chunk).detach().float().cpu())
        if has_matches:
            matches.append(_all_matched(reward.matches(img, chunk), len(chunk)))
    r = torch.cat(scores)
    r = torch.where(torch.isfinite(r), r, torch.full_like(r, float("nan")))
    return EvalResult(prompts=res.prompts, rewards=r.view(len(res.prompts), m).mean(dim=1),
                      images=res.images, matches=torch.cat(matches) if has_matches else None,
                      seconds=time.perf_counter() - t0, shift=res.shift,
                      image_rewards=r if m > 1 else None)  # fmt: skip


def paired_comparison(a: EvalResult, b: EvalResult) -> dict[str, float]:
    """:func:`~smartgrpo_fast.search.paired_stats` of a's rewards over b's on the same prompts,
    over the prompts where both are finite; ``excluded`` counts the others."""
    if a.prompts != b.prompts:
        raise ValueError("b: expected the same prompts as a, in the same order")
    if a.images_per_prompt != b.images_per_prompt:
        raise ValueError(f"b: expected {a.images_per_prompt} images per prompt like a, got "
                         f"{b.images_per_prompt}")  # fmt: skip
    both = torch.isfinite(a.rewards) & torch.isfinite(b.rewards)
    return {**paired_stats(a.rewards[both], b.rewards[both]), "excluded": int((~both).sum())}


def result_dict(
    res: EvalResult,
    config: EvalConfig,
    *,
    base: EvalResult | None = None,
    meta: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What ``smartgrpo-fast eval`` writes to result.json (NaN and inf as null).

    Keys: ``config`` (``eval``: ``config`` with the shift used, plus ``meta``), ``prompts``,
    ``reward`` (per prompt, ``res``'s: the mean of its images'), ``reward_images`` (per image,
    prompt-major; only with more than one image per prompt), ``match`` (per image, or null)
    and ``match_rate``, ``nonfinite``; with ``base`` (the base model on the same prompts and
    noise) also ``reward_base`` (and ``reward_images_base``), ``match_base``,
    ``match_rate_base``; ``summary`` (``reward`` and
    ``reward_base``: :meth:`EvalResult.summary`; ``adapter_vs_base``:
    :func:`paired_comparison` of ``res`` over ``base``), ``seconds`` (``eval``, ``base``),
    then ``extra``'s keys.
    """
    out: dict[str, Any] = {
        "config": {"eval": {**asdict(config), "shift": res.shift}, **(meta or {})},
        "prompts": res.prompts,
        "reward": res.rewards.tolist(),
        **_image_rewards(res, ""),
        "match": None if res.matches is None else res.matches.tolist(),
        "match_rate": res.match_rate,
        "nonfinite": res.nonfinite,
    }
    summary: dict[str, Any] = {"reward": res.summary()}
    seconds = {"eval": res.seconds}
    if base is not None:
        out |= {
            "reward_base": base.rewards.tolist(),
            **_image_rewards(base, "_base"),
            "match_base": None if base.matches is None else base.matches.tolist(),
            "match_rate_base": base.match_rate,
        }
        summary |= {"reward_base": base.summary(),
                    "adapter_vs_base": paired_comparison(res, base)}  # fmt: skip
        seconds["base"] = base.seconds
    return _finite({**out, "summary": summary, "seconds": seconds, **(extra or {})})


def _image_rewards(res: EvalResult, suffix: str) -> dict[str, Any]:
    if res.image_rewards is None:
        return {}
    return {f"reward_images{suffix}": res.image_rewards.tolist()}


def reward_labels(rewards: torch.Tensor, nrow: int) -> list[str]:
    """A grid row's label per ``nrow`` images: their index range and the mean of their
    finite (N,) ``rewards``, e.g. ``0-7: reward 0.312`` (``n/a`` when none is finite)."""
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1 or not rewards.numel():
        got = tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        raise ValueError(f"rewards: expected a non-empty (N,) tensor, got {got}")
    if isinstance(nrow, bool) or not isinstance(nrow, int) or nrow < 1:
        raise ValueError(f"nrow: expected an integer >= 1, got {nrow!r}")
    r = rewards.detach().double().cpu()
    labels = []
    for a in range(0, r.numel(), nrow):
        b = min(r.numel(), a + nrow) - 1
        row = r[a : b + 1]
        row = row[torch.isfinite(row)]
        value = f"{float(row.mean()):.3f}" if row.numel() else "n/a"
        labels.append(f"{a}-{b}: reward {value}" if b > a else f"{a}: reward {value}")
    return labels


def save_grid(
    images: torch.Tensor,
    path: str | Path,
    *,
    nrow: int = 8,
    labels: list[str] | None = None,
    cell: int = 128,
) -> Path:
    """Write (N, 3, H, W) images in [0, 1] as a PNG grid of ``nrow`` images per row (the last
    row padded with white), each row labelled (default: the index range of its images, e.g.
    ``0-7``). Tiles are scaled to about ``cell`` pixels: small images up by an integer factor,
    larger ones down (antialiased). Drawn by :func:`smartgrpo_fast.shapes.grid.save_grid`.
    """
    from smartgrpo_fast.shapes.grid import save_grid as save_rows

    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3 \
            or images.shape[0] < 1:  # fmt: skip
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images: expected (N, 3, H, W) with N >= 1, got {got}")
    if isinstance(nrow, bool) or not isinstance(nrow, int) or nrow < 1:
        raise ValueError(f"nrow: expected an integer >= 1, got {nrow!r}")
    n, _, h, w = images.shape
    rows = math.ceil(n / nrow)
    if labels is None:
        ends = [(i * nrow, min(n, (i + 1) * nrow) - 1) for i in range(rows)]
        labels = [f"{a}-{b}" if b > a else f"{a}" for a, b in ends]
    elif len(labels) != rows:
        raise ValueError(f"labels: expected {rows} row labels, got {len(labels)}")
    img = images.detach().float().cpu().clamp(0, 1)
    if max(h, w) > cell:
        size = (max(1, round(h * cell / max(h, w))), max(1, round(w * cell / max(h, w))))
        img = torch.nn.functional.interpolate(img, size=size, mode="bilinear", antialias=True)
    pad = torch.ones(rows * nrow - n, *img.shape[1:])
    grid = torch.cat([img, pad]).view(rows, nrow, *img.shape[1:])
    return save_rows(grid, labels, path, scale=max(1, cell // max(img.shape[-2:])))
