"""Deprecated: the embedded flow model is :mod:`smartgrpo_fast.shapes.model` (its vocabulary
and :func:`tokenize` are in :mod:`smartgrpo_fast.shapes.data`)."""

from smartgrpo_fast._deprecated import moved
from smartgrpo_fast.shapes.data import PROMPT_WORDS, VOCAB, WEIGHTS_DIR, tokenize
from smartgrpo_fast.shapes.model import *  # noqa: F403
from smartgrpo_fast.shapes.model import __all__ as _all

moved("smartgrpo_fast.models.tiny.model", "smartgrpo_fast.shapes.model")

__all__ = [*_all, "PROMPT_WORDS", "VOCAB", "WEIGHTS_DIR", "tokenize"]
