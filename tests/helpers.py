"""Comparison helpers for the op tests, and prompts for the reward tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import torch

from smartgrpo_fast.shapes import COLORS, SHAPES, prompt_of

#: (atol, rtol) per output dtype: float32 math everywhere, so the storage rounding dominates.
TOL: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 1.6e-2),
}


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    name: str = "output",
) -> None:
    """Like torch.testing.assert_close, but reports the first mismatches and any NaN/inf."""
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    d_atol, d_rtol = TOL.get(actual.dtype, TOL[torch.float32])
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    both_nan = torch.isnan(a) & torch.isnan(e)
    bad = ~(((a - e).abs() <= atol + rtol * e.abs()) | both_nan)
    bad |= torch.isnan(a) != torch.isnan(e)
    if bool(bad.any()):
        where = bad.nonzero()[:5].tolist()
        lines = [
            f"  at {tuple(i)}: got {a[tuple(i)].item()!r}, expected {e[tuple(i)].item()!r}"
            for i in where
        ]
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {a.numel()} elements differ (atol={atol}, "
            f"rtol={rtol}); max abs diff {float((a - e).abs().nan_to_num(0).max()):.3g}; "
            f"NaN in output: {int(torch.isnan(a).sum())}\n" + "\n".join(lines)
        )


#: float32's machine epsilon (2**-23).
FLOAT32_EPS = float(torch.finfo(torch.float32).eps)


def assert_float_order_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    name: str = "output",
    roundings: int = 256,
) -> None:
    """``actual`` equals ``expected`` up to float32 reduction order.

    What passes through a model forward (a matmul, a convolution, a softmax, a mean) is summed
    in an order that oneDNN/MKL choose by batch size, thread count and CPU ISA (AVX2 on AMD,
    AVX-512 on Intel, ``ATEN_CPU_CAPABILITY``), and even an elementwise ``exp`` or ``sigmoid``
    rounds differently in its SIMD body and its scalar tail, whose split moves with the
    tensor's size. So the same rows computed in other batches agree only to rounding,
    elementwise ``|a - e| <= roundings * eps32 * scale`` with ``scale`` the largest
    ``|expected|`` (at least 1, so values near zero get the floor of ``roundings`` ulps of 1).
    The default, 256 roundings (3.1e-5 of the scale), covers a few layers of a small network;
    a test of a deeper computation says why it passes more. Exact quantities (noise, keys,
    prompt order, checkpoints) are compared with ``torch.equal``.
    """
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    e = expected.detach().double().cpu()
    scale = max(1.0, float(e.abs().nan_to_num(0.0, 0.0, 0.0).max()) if e.numel() else 1.0)
    atol = roundings * FLOAT32_EPS * scale
    assert_close(actual, expected, atol=atol, rtol=0.0, name=f"{name} (float32 order, {roundings} "
                 f"roundings of scale {scale:.3g})")  # fmt: skip


def mismatched_prompts(attrs, which: str) -> list[str]:
    """Prompts with one attribute changed (colour changes keep colour != background)."""
    s, c, b = attrs.shape.clone(), attrs.color.clone(), attrs.background.clone()
    n_col = len(COLORS)
    if which == "shape":
        s = (s + 1) % len(SHAPES)
    elif which == "color":
        c = (c + 1) % n_col
        c = torch.where(c == b, (c + 1) % n_col, c)
    else:
        b = (b + 1) % n_col
        b = torch.where(b == c, (b + 1) % n_col, b)
    return [prompt_of(int(x), int(y), int(z)) for x, y, z in zip(s, c, b, strict=True)]


def load_benchmark(name: str) -> ModuleType:
    """The script ``benchmarks/NAME.py`` imported as a module (benchmarks/ is no package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: One step of the sd35-medium config at the tiny size (random:sd3-tiny, CPU): 1 prompt x 2
#: rollouts, 2 SDE steps, K 2 x 1 round.
SD35_TINY_STEP = [
    "model.name=random:sd3-tiny", "model.dtype=float32", "model.resolution=null",
    "model.graph=eager", "device=cpu", "reward=tiny-color", "sample.prompts_per_step=1",
    "sample.group_size=2", "sample.steps=4", "sample.sde_window_range=[0, 3]", "search.k=2",
    "search.rounds=1", "search.top=1", "search.decode_size=null", "train.steps=1",
    "train.micro_batch=2", "eval.every=0", "log.progress=false", "log.tensorboard=false",
    "lora.rank=2", "lora.alpha=4",
]  # fmt: skip
