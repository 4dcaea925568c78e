"""Package metadata and public surface."""

from __future__ import annotations

from importlib import metadata, resources

import smartgrpo_fast
from smartgrpo_fast import ops


def test_version_matches_distribution() -> None:
    assert smartgrpo_fast.__version__ == metadata.version("smartgrpo-fast")


def test_typed_marker_ships() -> None:
    assert resources.files("smartgrpo_fast").joinpath("py.typed").is_file()


def test_public_ops_contract() -> None:
    for name in ("sample_perturb", "x0_estimate", "topk_select", "cem_update", "philox_normal"):
        assert callable(getattr(ops, name)), name
        assert getattr(smartgrpo_fast, name) is getattr(ops, name)
        assert getattr(ops, name).__doc__, f"{name} has no docstring"
