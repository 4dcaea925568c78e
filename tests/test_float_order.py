"""What is exact and what is equal only up to float32 order, checked on two sets of CPU kernels.

Tests marked ``float_order`` compare floats computed in other batch sizes, splits or processes
(:func:`helpers.assert_float_order_close`). They pass on the machine's own ATen kernels (the
rest of the suite runs them so: AVX2 on AMD, AVX-512 on Intel) and, here, again in a child
process under ``ATEN_CPU_CAPABILITY=default`` (the scalar baseline), so that an assertion which
holds only for one CPU's kernels fails on every machine, not only on some.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import FLOAT32_EPS, assert_float_order_close

ROOT = Path(__file__).resolve().parents[1]


def test_helper_tolerates_rounding_and_catches_real_differences() -> None:
    x = torch.linspace(-30.0, 30.0, 101)
    assert_float_order_close(x * (1 + 8 * FLOAT32_EPS), x)  # 8 roundings of the scale
    assert_float_order_close(torch.full((3,), 1e-9), torch.zeros(3))  # floor: ulps of 1
    with pytest.raises(AssertionError, match="float32 order, 256 roundings of scale 30"):
        assert_float_order_close(x + 1e-3, x)  # 280 roundings of 30: a real difference
    with pytest.raises(AssertionError, match="NaN"):
        assert_float_order_close(torch.tensor([float("nan")]), torch.tensor([0.0]))
    assert_float_order_close(x + 1e-3, x, roundings=512)  # a deeper computation says so


def _capability(env: dict[str, str]) -> str:
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120, check=True)  # fmt: skip
    return proc.stdout.strip()


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("ATEN_CPU_CAPABILITY", "").lower() == "default",
    reason="this process already runs the baseline kernels",
)
def test_float_order_tests_pass_on_the_baseline_cpu_kernels() -> None:
    env = dict(os.environ) | {"ATEN_CPU_CAPABILITY": "default", "PYTHONUNBUFFERED": "1"}
    assert _capability(env) == "DEFAULT"
    cmd = [sys.executable, "-m", "pytest", "-m", "float_order", "-q", "-p", "no:cacheprovider",
           "-o", "addopts=", str(ROOT / "tests")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    tail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and " deselected" in proc.stdout, tail
