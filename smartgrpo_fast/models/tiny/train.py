"""Deprecated: the flow model's trainer is :mod:`smartgrpo_fast.shapes.train_model`
(``python -m smartgrpo_fast.shapes.train_model``)."""

from smartgrpo_fast._deprecated import moved
from smartgrpo_fast.shapes.train_model import *  # noqa: F403
from smartgrpo_fast.shapes.train_model import __all__ as __all__
from smartgrpo_fast.shapes.train_model import main

moved("smartgrpo_fast.models.tiny.train", "smartgrpo_fast.shapes.train_model")

if __name__ == "__main__":
    raise SystemExit(main())
