"""The embedded shapes world: prompts and images of one coloured shape on a coloured
background, a tiny SD3-architecture flow model that draws them, the rewards that judge them,
the trainers of both and the shipped weights (``weights/``).

* :mod:`.data` — prompts, vocabulary and rendering (torch only);
* :mod:`.model` — :class:`TinyFlowModel`, ``smartgrpo_fast.models.load("tiny")``;
* :mod:`.reward` — the classifier and colour rewards, ``smartgrpo_fast.rewards.load("tiny")``
  (also ``tiny-prob``, ``tiny-min``, ``tiny-color``);
* :mod:`.judge` — :class:`ShapesJudge`, an analytic judge read off the rendering rules, that
  shares nothing with the classifier (``smartgrpo_fast.rewards.load("shapes-judge")``);
* :mod:`.train_model`, :mod:`.train_reward` — the two trainers (``python -m``);
* :mod:`.evaluate` — how often generated images match their prompts, by either judge;
* :mod:`.grid` — an image grid of prompts x seeds (``python -m``).

Importing this package loads only :mod:`.data`; the other names here are imported on first
use, so that the rewards never pull in the flow model, the sampler or diffusers.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from smartgrpo_fast.shapes.data import (
    COLORS,
    IMAGE_SIZE,
    SHAPES,
    VOCAB,
    WEIGHTS_DIR,
    Attributes,
    attributes_from_prompt,
    prompt_of,
    render,
    sample_attributes,
    sample_batch,
    sample_prompts,
    tokenize,
)

#: Names served lazily, by module.
_LAZY = {
    "model": ("TinyArch", "TinyFlowModel", "TinyTextEncoder"),
    "reward": ("ColorFidelityReward", "TinyClassifier", "TinyClassifierReward"),
    "judge": ("ShapesJudge",),
    "evaluate": (
        "GenerationReport",
        "generation_accuracy",
        "generation_matches",
        "real_image_accuracy",
    ),
}
_LAZY_MODULE = {name: module for module, names in _LAZY.items() for name in names}

__all__ = [
    "COLORS",
    "IMAGE_SIZE",
    "SHAPES",
    "VOCAB",
    "WEIGHTS_DIR",
    "Attributes",
    "ColorFidelityReward",
    "GenerationReport",
    "ShapesJudge",
    "TinyArch",
    "TinyClassifier",
    "TinyClassifierReward",
    "TinyFlowModel",
    "TinyTextEncoder",
    "attributes_from_prompt",
    "generation_accuracy",
    "generation_matches",
    "prompt_of",
    "real_image_accuracy",
    "render",
    "sample_attributes",
    "sample_batch",
    "sample_prompts",
    "tokenize",
]


def __getattr__(name: str) -> Any:
    module = _LAZY_MODULE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
