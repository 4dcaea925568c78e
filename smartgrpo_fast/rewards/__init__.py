"""Reward models behind one protocol, and a loader.

``load("tiny")`` is the embedded prompt-matching classifier reward (mean log-probability of
the prompt's attributes); ``load("tiny-prob")`` its probability form; ``load("tiny-color")`` the
analytic colour-fidelity reward.
"""

from __future__ import annotations

from typing import Any

from smartgrpo_fast.rewards.base import Reward, check_images

__all__ = ["NAMES", "Reward", "check_images", "load"]

NAMES = ("tiny", "tiny-prob", "tiny-color")


def load(name_or_path: str, **kwargs: Any) -> Reward:
    """A reward by name (see :data:`NAMES`); keyword arguments go to its loader."""
    from smartgrpo_fast.rewards import tiny

    if name_or_path == "tiny":
        return tiny.TinyClassifierReward.load(mode="logprob", **kwargs)
    if name_or_path == "tiny-prob":
        return tiny.TinyClassifierReward.load(mode="prob", **kwargs)
    if name_or_path == "tiny-color":
        return tiny.ColorFidelityReward(**kwargs)
    raise ValueError(f"name_or_path: expected one of {', '.join(NAMES)}, got {name_or_path!r}")
