"""Shared fixtures. Kernels are proven on CPU through Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before triton is first imported (diffusers imports it),
so it is set here, at the top of the first conftest, on machines without CUDA.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import importlib

import pytest

from smartgrpo_fast.graphs import in_enclosing_graph
from smartgrpo_fast.ops._cpp import cpu_extension
from smartgrpo_fast.ops._triton import HAS_TRITON, interpreting

HAS_CUDA = torch.cuda.is_available()
_OP_MODULES = [
    f"smartgrpo_fast.ops.{m}"
    for m in ("philox", "sample_perturb", "x0_estimate", "topk_select", "cem_update")
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


def _nan_alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, -1, dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def nan_filled_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every op output starts as NaN (-1 for ints): an element a kernel forgets fails."""
    for name in _OP_MODULES:
        # importlib: the package re-exports each op under its module's name.
        monkeypatch.setattr(importlib.import_module(name), "alloc", _nan_alloc)


@pytest.fixture(autouse=True)
def default_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SMARTGRPO_BACKEND", raising=False)


def use_backend(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Force a backend for the rest of a test; skip when it cannot run on CPU tensors here."""
    if name == "triton" and not (HAS_TRITON and interpreting()):
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set on CPU-only machines)")
    if name == "cpp" and not (ext := cpu_extension()).ok:
        pytest.skip(f"the C++ extension could not be built here: {ext.reason}")
    monkeypatch.setenv("SMARTGRPO_BACKEND", name)


@pytest.fixture(params=["reference", "triton", "cpp"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on the PyTorch reference, the (interpreted) Triton kernels and the C++ ops."""
    use_backend(monkeypatch, request.param)
    return request.param


@pytest.fixture
def run_reference(monkeypatch: pytest.MonkeyPatch):
    """Call ``fn`` with the reference backend forced, then restore the previous backend."""

    def run(fn, *args, **kwargs):
        prev = os.environ.get("SMARTGRPO_BACKEND")
        os.environ["SMARTGRPO_BACKEND"] = "reference"
        try:
            return fn(*args, **kwargs)
        finally:
            if prev is None:
                os.environ.pop("SMARTGRPO_BACKEND", None)
            else:
                os.environ["SMARTGRPO_BACKEND"] = prev

    return run


@pytest.fixture
def compiled(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """torch.compile recorded: every call of a compiled function appends (mode, inside an
    enclosing graph); the function itself runs eagerly."""
    calls: list[tuple[str, bool]] = []

    def fake_compile(fn, *, mode=None, dynamic=None):
        def run(*args):
            calls.append((mode, in_enclosing_graph()))
            return fn(*args)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    return calls
