"""Package metadata and public surface."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata, resources
from pathlib import Path

import pytest

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


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())


def test_triton_is_an_extra_not_a_core_dependency() -> None:
    """A CPU install (``pip install -e .``) brings no triton: torch's CUDA wheels bring it
    where its kernels run; the ``triton`` extra (in ``dev``) serves the interpreter."""
    project = _pyproject()["project"]
    assert not [d for d in project["dependencies"] if d.lower().startswith("triton")]
    extras = project["optional-dependencies"]
    assert any(d.startswith("triton>=") for d in extras["triton"])
    assert any("triton" in d for d in extras["dev"] if d.startswith("smartgrpo-fast["))


def test_without_triton_the_ops_run_and_the_triton_backend_says_how_to_get_it() -> None:
    code = (
        "import sys; sys.modules['triton'] = None\n"  # import triton -> ImportError
        "import os, torch\n"
        "from smartgrpo_fast.ops import philox_normal\n"
        "from smartgrpo_fast.ops._triton import HAS_TRITON\n"
        "assert not HAS_TRITON\n"
        "n = philox_normal((1, 2, 8), seed=0)\n"
        "assert n.shape == (1, 2, 8)\n"
        "os.environ['SMARTGRPO_BACKEND'] = 'triton'\n"
        "try:\n"
        "    philox_normal((1, 2, 8), seed=0)\n"
        "except ValueError as e:\n"
        "    print(e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("SMARTGRPO_BACKEND=triton: triton is not installed")
    assert "pip install 'smartgrpo-fast[triton]'" in proc.stdout
