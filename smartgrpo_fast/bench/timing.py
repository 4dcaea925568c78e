"""Timing one call: warm-up calls, timed calls, quantiles of the per-call times.

On CUDA, CUDA events around each call, after the warm-up calls (which also compile the Triton
kernels), with a 256 MiB buffer zeroed before each call to flush the L2 cache (what
``triton.testing.do_bench`` does); on CPU, ``time.perf_counter`` around each call after the
warm-up. Every call runs under ``torch.no_grad()``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["Timing", "measure", "quantile", "summarize", "synchronize"]

_L2_FLUSH_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Timing:
    """Quantiles of the per-call times of one measurement, in ms."""

    median: float
    p20: float
    p80: float
    samples: tuple[float, ...]


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0 <= q <= 1) of ``values``, linearly interpolated (numpy's default)."""
    if not values:
        raise ValueError("values: expected at least one value")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q: expected 0 <= q <= 1, got {q}")
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(samples: Sequence[float]) -> Timing:
    """Median, p20 and p80 of ``samples`` (per-call times, in the unit they come in)."""
    return Timing(
        median=quantile(samples, 0.5),
        p20=quantile(samples, 0.2),
        p80=quantile(samples, 0.8),
        samples=tuple(samples),
    )


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device``: a CUDA synchronize, nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_cpu(fn: Callable[[], object], *, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def _time_cuda(
    fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int
) -> list[float]:
    with torch.cuda.device(device):
        flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=device)
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize(device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for start, end in zip(starts, ends, strict=True):
            flush.zero_()  # evict the inputs from L2: every call starts cold
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in zip(starts, ends, strict=True)]


def measure(fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int) -> Timing:
    """Time ``fn()`` in ms: CUDA events on CUDA devices, ``time.perf_counter`` elsewhere."""
    with torch.no_grad():
        if device.type == "cuda":
            samples = _time_cuda(fn, device, warmup=warmup, repeats=repeats)
        else:
            samples = _time_cpu(fn, warmup=warmup, repeats=repeats)
    return summarize(samples)
