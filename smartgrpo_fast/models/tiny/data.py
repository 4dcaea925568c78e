"""Deprecated: the embedded world's data is :mod:`smartgrpo_fast.shapes.data`."""

from smartgrpo_fast._deprecated import moved
from smartgrpo_fast.shapes.data import *  # noqa: F403
from smartgrpo_fast.shapes.data import __all__ as __all__

moved("smartgrpo_fast.models.tiny.data", "smartgrpo_fast.shapes.data")
