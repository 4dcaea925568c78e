"""Reward models behind one protocol, a loader, and weighted sums.

Names for :func:`load`:

* ``tiny`` — the embedded prompt-matching classifier: mean log-probability of the prompt's
  shape, colour and background; ``tiny-prob`` its probability form; ``tiny-min`` the
  log-probability of the least likely attribute; ``tiny-color`` the analytic colour fidelity
  (:mod:`smartgrpo_fast.shapes.reward`, which imports neither the flow models nor the
  sampler: nothing in this package does);
* ``shapes-judge`` — the embedded world's analytic judge, read from the rendering rules: the
  fraction of the prompt's three attributes the image shows, for judging what the classifier
  guided (:mod:`smartgrpo_fast.shapes.judge`);
* ``shape-area``, ``saturation``, ``brightness``, ``jpeg-compressibility``,
  ``jpeg-incompressibility`` — rewards read from the image alone (no prompt, no weights): the
  foreground's share of the image, the mean colour saturation, the mean pixel value, DDPO's
  JPEG size (:mod:`.image`);
* ``imagereward`` — ImageReward checkpoints on transformers' BLIP (:mod:`.imagereward`);
* ``aesthetic`` — the LAION aesthetic predictor on CLIP ViT-L/14; ``pickscore``; ``clipscore``
  (:mod:`.clip`).

Real checkpoints load from paths given as keyword arguments or from the Hugging Face cache
(never downloaded). :func:`reward_from_spec` turns the CLI's ``NAME[:WEIGHT],...`` into a
reward (a :class:`~smartgrpo_fast.rewards.combine.WeightedSum` when there are several).

Every shipped reward also splits its call into ``prepare(prompts)`` (prompt tensors, made on
the host side once) and ``score(images, prepared)`` (tensors only: safe inside a captured CUDA
graph); :func:`prepare_prompts` and :func:`score_prepared` work for any reward.
"""

from __future__ import annotations

from typing import Any

from smartgrpo_fast.rewards.base import (
    PreparedPrompts,
    PreparedReward,
    Reward,
    check_images,
    prepare_prompts,
    score_prepared,
)

__all__ = [
    "DTYPES",
    "NAMES",
    "WORLD_PROMPT_REWARDS",
    "PreparedPrompts",
    "PreparedReward",
    "Reward",
    "check_images",
    "check_names",
    "check_prompts",
    "load",
    "prepare_prompts",
    "reward_dtype",
    "reward_from_spec",
    "score_prepared",
]

NAMES = (
    "tiny", "tiny-prob", "tiny-min", "tiny-margin", "tiny-color", "shapes-judge", "imagereward",
    "aesthetic",
    "pickscore", "clipscore",
    "shape-area", "saturation", "brightness", "jpeg-compressibility", "jpeg-incompressibility",
)  # fmt: skip
#: Rewards that parse each prompt into the embedded world's shape, colour and background.
WORLD_PROMPT_REWARDS = (
    "tiny",
    "tiny-prob",
    "tiny-min",
    "tiny-margin",
    "tiny-color",
    "shapes-judge",
)
_IMAGE_REWARDS = {
    "shape-area": ("ShapeAreaReward", {}),
    "saturation": ("SaturationReward", {}),
    "brightness": ("BrightnessReward", {}),
    "jpeg-compressibility": ("JpegReward", {"compressible": True}),
    "jpeg-incompressibility": ("JpegReward", {"compressible": False}),
}
_TINY_MODES = {"tiny": "logprob", "tiny-prob": "prob", "tiny-min": "min", "tiny-margin": "margin"}
#: The ``dtype`` names a config or a command line may give a reward loader.
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}  # fmt: skip


def reward_dtype(value: Any) -> Any:
    """``value`` as a torch dtype: a float torch.dtype, or one of :data:`DTYPES`' names (a
    YAML config's ``reward_args: {dtype: bfloat16}``); a ValueError naming ``dtype`` else."""
    import torch

    if isinstance(value, torch.dtype) and value.is_floating_point:
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in DTYPES:
        return getattr(torch, DTYPES[value.removeprefix("torch.")])
    raise ValueError(
        f"dtype: expected one of {', '.join(sorted(set(DTYPES.values())))} (or a float "
        f"torch.dtype), got {value!r}"
    )


def load(name_or_path: str, **kwargs: Any) -> Reward:
    """A reward by name (see :data:`NAMES`); keyword arguments go to its loader (paths of
    real checkpoints, ``device``, ``dtype``: a float torch.dtype or its name, see
    :func:`reward_dtype`)."""
    if "dtype" in kwargs:
        kwargs["dtype"] = reward_dtype(kwargs["dtype"])
    if name_or_path in _TINY_MODES:
        from smartgrpo_fast.shapes.reward import TinyClassifierReward

        return TinyClassifierReward.load(mode=_TINY_MODES[name_or_path], **kwargs)
    if name_or_path in ("tiny-color", "shapes-judge"):
        from smartgrpo_fast.shapes import judge, reward

        kwargs.pop("device", None)  # analytic: runs on the images' device
        kwargs.pop("dtype", None)
        cls = reward.ColorFidelityReward if name_or_path == "tiny-color" else judge.ShapesJudge
        return cls(**kwargs)
    if name_or_path in _IMAGE_REWARDS:
        from smartgrpo_fast.rewards import image

        kwargs.pop("device", None)  # analytic: runs on the images' device
        kwargs.pop("dtype", None)
        cls, fixed = _IMAGE_REWARDS[name_or_path]
        return getattr(image, cls)(**fixed, **kwargs)
    if name_or_path == "imagereward":
        from smartgrpo_fast.rewards.imagereward import load_imagereward

        return load_imagereward(**kwargs)
    if name_or_path in ("aesthetic", "pickscore", "clipscore"):
        from smartgrpo_fast.rewards import clip

        return getattr(clip, f"load_{name_or_path}")(**kwargs)
    raise ValueError(f"name_or_path: expected one of {', '.join(NAMES)}, got {name_or_path!r}")


def reward_from_spec(spec: str, **kwargs: Any) -> Reward:
    """``"NAME"`` -> that reward; ``"NAME[:WEIGHT],..."`` -> a WeightedSum of them. Keyword
    arguments go to every loader."""
    from smartgrpo_fast.rewards.combine import WeightedSum, parse_reward_spec

    weights = parse_reward_spec(spec)
    if len(weights) == 1 and next(iter(weights.values())) == 1.0:
        return load(next(iter(weights)), **kwargs)
    return WeightedSum(weights, **kwargs)


def check_names(spec: str) -> dict[str, float]:
    """The ``{name: weight}`` of a reward spec whose every name is one of :data:`NAMES`; a
    ValueError naming the part otherwise. Loads nothing."""
    from smartgrpo_fast.rewards.combine import parse_reward_spec

    weights = parse_reward_spec(spec)
    for name in weights:
        if name not in NAMES:
            raise ValueError(f"expected reward names of {', '.join(NAMES)}, got {name!r}")
    return weights


def check_prompts(spec: str, prompts: list[str]) -> None:
    """A ValueError starting ``prompts:`` when a reward of ``spec`` cannot read a prompt (the
    embedded world's rewards read only its grammar: :data:`WORLD_PROMPT_REWARDS`). Loads
    nothing, so a command can check its prompts before any work."""
    from smartgrpo_fast.shapes.data import check_prompts as check_world

    for name in check_names(spec):
        if name in WORLD_PROMPT_REWARDS:
            check_world(prompts, reader=f"reward {name!r}")
            return
