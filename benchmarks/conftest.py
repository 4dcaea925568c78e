"""Options of the pytest-benchmark suite: device, dtype and sizes of the op cases.

Sizes default to the engine's: 64K to 16M elements on CPU; 1M, 4M, 16M, 64M on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from smartgrpo_fast.bench.case import DTYPES, parse_device
from smartgrpo_fast.bench.op_cases import MIN_SIZE
from smartgrpo_fast.bench.ops import CPU_SIZES, CUDA_SIZES


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("smartgrpo_fast", "smartgrpo_fast benchmark cases")
    group.addoption(
        "--bench-device",
        default=None,
        help="cpu, cuda or cuda:N (default: cuda if available, else cpu)",
    )
    group.addoption(
        "--bench-dtype",
        default="float32",
        choices=tuple(DTYPES),
        help="storage dtype of the latents (default: float32)",
    )
    group.addoption(
        "--bench-sizes",
        default=None,
        help="comma-separated K·D element counts, each >= 256 (default: by device)",
    )


def _device(config: pytest.Config) -> torch.device:
    name = config.getoption("--bench-device")
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = parse_device(name)
    except ValueError as err:
        raise pytest.UsageError(f"--bench-device: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"--bench-device: {name!r} requested but CUDA is not available")
    return device


def _sizes(config: pytest.Config, device: torch.device) -> tuple[int, ...]:
    text = config.getoption("--bench-sizes")
    if text is None:
        return CUDA_SIZES if device.type == "cuda" else CPU_SIZES
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise pytest.UsageError(
            f"--bench-sizes: expected comma-separated ints, got {text!r}"
        ) from None
    if not sizes or min(sizes) < MIN_SIZE:
        raise pytest.UsageError(f"--bench-sizes: expected ints >= {MIN_SIZE}, got {text!r}")
    return sizes


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "size" in metafunc.fixturenames:
        sizes = _sizes(metafunc.config, _device(metafunc.config))
        metafunc.parametrize("size", sizes, ids=[f"x{s}" for s in sizes])


@pytest.fixture(scope="session")
def bench_device(pytestconfig: pytest.Config) -> torch.device:
    """The device the cases run on."""
    return _device(pytestconfig)


@pytest.fixture(scope="session")
def bench_dtype(pytestconfig: pytest.Config) -> torch.dtype:
    """The storage dtype of the latents."""
    return DTYPES[pytestconfig.getoption("--bench-dtype")]
