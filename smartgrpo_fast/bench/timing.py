"""Timing one call: warm-up calls, timed calls, quantiles of the per-call times.

Three measurements, each under ``torch.no_grad()``:

* :func:`measure`: on CUDA, CUDA events around each call, after the warm-up calls (which also
  compile the Triton kernels), with a 256 MiB buffer zeroed before each call to flush the L2
  cache (what ``triton.testing.do_bench`` does); on CPU, ``time.perf_counter`` around each call
  after the warm-up. With ``sync_each=True`` the device is also synchronised after the flush,
  before the start event: the interval then holds the call's host work too (the Python, the
  launches) and not only what the GPU ran, i.e. what a Python caller pays for one call.
* :func:`measure_graph` (CUDA only): the kernels alone. ``calls`` calls are captured in one CUDA
  graph, which is replayed ``replays`` times between CUDA events, the L2 flush before each
  replay and outside the timed interval; a sample is the replay's time over ``calls``. Inside a
  replay the calls run back to back, so inputs small enough for the L2 cache stay in it after
  the first call.
* :func:`measure_host`: microseconds of host time a call, ``time.perf_counter`` around
  ``calls`` calls (no synchronisation inside the interval: on CUDA only the enqueueing is
  timed, on CPU the whole call), median over ``rounds``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "Timing",
    "measure",
    "measure_graph",
    "measure_host",
    "quantile",
    "summarize",
    "synchronize",
]

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
    fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int, sync_each: bool
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
            if sync_each:  # the GPU idles until the call's host work is done: count it
                torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in zip(starts, ends, strict=True)]


def measure(
    fn: Callable[[], object],
    device: torch.device,
    *,
    warmup: int,
    repeats: int,
    sync_each: bool = False,
) -> Timing:
    """Time ``fn()`` in ms: CUDA events on CUDA devices, ``time.perf_counter`` elsewhere
    (``sync_each``: on CUDA, synchronise before each start event, so that the call's host work
    is inside the interval)."""
    with torch.no_grad():
        if device.type == "cuda":
            samples = _time_cuda(fn, device, warmup=warmup, repeats=repeats, sync_each=sync_each)
        else:
            samples = _time_cpu(fn, warmup=warmup, repeats=repeats)
    return summarize(samples)


def measure_graph(
    fn: Callable[[], object], device: torch.device, *, calls: int = 100, replays: int = 10
) -> Timing:
    """The kernels of ``fn()`` alone, in ms a call: ``calls`` calls captured in one CUDA graph,
    replayed ``replays`` times between CUDA events, the L2 flushed before each replay (outside
    the timed interval). ``fn`` must be capturable and already warmed up (compiled). Raises
    whatever the capture raises (e.g. a call that synchronises)."""
    if device.type != "cuda":
        raise ValueError(f"device: measure_graph needs a CUDA device, got {device}")
    if calls < 1 or replays < 1:
        raise ValueError(f"calls, replays: expected >= 1, got {calls}, {replays}")
    with torch.no_grad(), torch.cuda.device(device):
        flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            fn()  # a first call on the capture stream, outside the graph
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        graph.replay()  # uploads the graph: the first replay costs more
        torch.cuda.synchronize(device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
        for start, end in zip(starts, ends, strict=True):
            flush.zero_()
            start.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize(device)
        samples = [s.elapsed_time(e) / calls for s, e in zip(starts, ends, strict=True)]
        del graph
    return summarize(samples)


def measure_host(
    fn: Callable[[], object],
    device: torch.device,
    *,
    calls: int = 200,
    rounds: int = 5,
    warmup: int = 20,
) -> Timing:
    """Host microseconds a call of ``fn()``: ``time.perf_counter`` around ``calls`` calls, one
    sample a round (``rounds``), after ``warmup`` calls. Nothing is synchronised inside the
    interval: on CUDA this is the cost of enqueueing (the GPU keeps up when its kernels are
    shorter than the host work), on CPU the whole call."""
    if calls < 1 or rounds < 1:
        raise ValueError(f"calls, rounds: expected >= 1, got {calls}, {rounds}")
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(rounds):
            synchronize(device)
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            samples.append((time.perf_counter() - start) / calls * 1e6)
        synchronize(device)
    return summarize(samples)
