"""Deprecated: the embedded world's rewards are :mod:`smartgrpo_fast.shapes.reward`, the
classifier's trainer :mod:`smartgrpo_fast.shapes.train_reward` and the generation
evaluation :mod:`smartgrpo_fast.shapes.evaluate`.

The evaluation samples flow models, so its names are imported on first use: importing this
module, like the rest of the rewards package, imports neither the models nor the sampler.
"""

from typing import Any

from smartgrpo_fast._deprecated import moved
from smartgrpo_fast.shapes.reward import *  # noqa: F403
from smartgrpo_fast.shapes.reward import __all__ as _all
from smartgrpo_fast.shapes.train_reward import main, train_classifier

moved("smartgrpo_fast.rewards.tiny", "smartgrpo_fast.shapes.reward")

_EVALUATE = ("GenerationReport", "generation_accuracy", "real_image_accuracy")
__all__ = [*_all, *_EVALUATE, "main", "train_classifier"]


def __getattr__(name: str) -> Any:
    if name in _EVALUATE:
        from smartgrpo_fast.shapes import evaluate

        return getattr(evaluate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    raise SystemExit(main())
