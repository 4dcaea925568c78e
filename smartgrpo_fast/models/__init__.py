"""Flow-model adapters behind one protocol, and a loader.

``load(name_or_path)`` returns a :class:`FlowModel`: ``"tiny"`` is the embedded pixel-space
model that ships in the package (:mod:`smartgrpo_fast.shapes.model`); a local
StableDiffusion3Pipeline folder or a repo id already in the Hugging Face cache gives an
:class:`SD3FlowModel`; ``"random:sd35-medium"`` (or ``random:sd3-tiny``) one with random weights
and random prompt embeddings, built in memory
(:func:`~smartgrpo_fast.models.sd3_configs.random_sd3_model`), for timing without weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from smartgrpo_fast.models.base import Cond, FlowModel, repeat_rows

__all__ = ["Cond", "FlowModel", "SD3FlowModel", "check_prompts", "load", "repeat_rows"]


def __getattr__(name: str) -> Any:
    if name == "SD3FlowModel":  # lazy: diffusers is an optional extra
        from smartgrpo_fast.models.sd3 import SD3FlowModel

        return SD3FlowModel
    raise AttributeError(name)


def load(name_or_path: str | Path, **kwargs: Any) -> FlowModel:
    """Load a flow model: ``"tiny"`` (embedded), a StableDiffusion3Pipeline folder or
    HF-cache repo id, or ``"random:sd35-medium"`` / ``"random:sd3-tiny"`` (random weights).

    Keyword arguments go to :meth:`TinyFlowModel.from_pretrained` (device, dtype, graph, lora) or
    :meth:`SD3FlowModel.from_pretrained` (dtype, device, local_files_only, attention, config,
    lora). ``lora=PATH`` applies a peft adapter folder (:mod:`smartgrpo_fast.models.lora`).
    """
    if str(name_or_path) == "tiny":
        from smartgrpo_fast.shapes.model import TinyFlowModel

        return TinyFlowModel.from_pretrained(**kwargs)
    if str(name_or_path).startswith("random:"):
        from smartgrpo_fast.models.sd3_configs import random_sd3_model

        kwargs.pop("local_files_only", None)
        kwargs.pop("attention", None)
        return random_sd3_model(str(name_or_path).removeprefix("random:"), **kwargs)
    from smartgrpo_fast.models.sd3 import SD3FlowModel

    return SD3FlowModel.from_pretrained(name_or_path, **kwargs)


def check_prompts(name_or_path: str | Path, prompts: list[str]) -> None:
    """A ValueError starting ``prompts:`` when the model cannot encode a prompt (the embedded
    model reads 7 words of its vocabulary; SD3 reads any text). Loads nothing."""
    if str(name_or_path) == "tiny":
        from smartgrpo_fast.shapes.data import check_prompts as check_world

        check_world(prompts, reader="the embedded model 'tiny'", grammar=False)
