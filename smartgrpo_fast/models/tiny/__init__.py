"""Deprecated: the embedded model and its world are :mod:`smartgrpo_fast.shapes`."""

from smartgrpo_fast._deprecated import moved
from smartgrpo_fast.shapes import *  # noqa: F403
from smartgrpo_fast.shapes import __all__ as __all__

moved("smartgrpo_fast.models.tiny", "smartgrpo_fast.shapes")
