"""Deprecated: the image grid is :mod:`smartgrpo_fast.shapes.grid`
(``python -m smartgrpo_fast.shapes.grid``)."""

from smartgrpo_fast._deprecated import moved
from smartgrpo_fast.shapes.grid import *  # noqa: F403
from smartgrpo_fast.shapes.grid import __all__ as __all__
from smartgrpo_fast.shapes.grid import main

moved("smartgrpo_fast.models.tiny.grid", "smartgrpo_fast.shapes.grid")

if __name__ == "__main__":
    raise SystemExit(main())
