"""Old import paths kept for one release: each shim module calls :func:`moved` on import."""

from __future__ import annotations

import warnings

__all__ = ["moved"]


def moved(old: str, new: str) -> None:
    """Warn (DeprecationWarning, at the importing line) that module ``old`` is now ``new``."""
    warnings.warn(
        f"{old} is deprecated and will be removed in the next release; import {new} instead",
        DeprecationWarning,
        stacklevel=3,
    )
