"""Benchmark of the four fused ops against the unfused PyTorch composition a user would write.

Providers
---------
* ``cpp``, ``reference``, ``triton``, ``cuda``: the public op
  (:func:`~smartgrpo_fast.ops.sample_perturb`, ...) with ``SMARTGRPO_BACKEND`` set to that
  backend for the measurement: the compiled C++ ops (CPU), the PyTorch reference, the Triton
  kernels (CUDA), the CUDA C++ ops. An op without a version for a backend runs what that backend
  falls back to (topk_select: the reference under ``cpp``, Triton under ``cuda``; x0_estimate:
  Triton under ``cuda``). The ops are called with ``validate=False`` unless
  :attr:`OpsBenchConfig.validate` is set, as in the search's hot loop (value checks read the
  tensors and synchronise a CUDA stream).
* ``unfused``: the plain PyTorch a user would write without the library:

  - sample_perturb: ``n = torch.randn(B, K, *S)`` materialised, then
    ``mean[:, None] + scale[:, None, None, None, None] * (mu[:, None] + sigma[:, None] * n)``;
  - x0_estimate: ``(z - t * v) / scaling + shift`` as separate torch ops;
  - topk_select: ``torch.topk(torch.nan_to_num(r, nan=-inf), T).indices``;
  - cem_update: the elites gathered from the (B, K, *S) noise ``n`` kept from sampling
    (allocated once, outside the timed call), ``eps = mu + sigma * n_elite``, then the mean and
    the population std (``unbiased=False``) over the elites.

Defaults: ``cpp``, ``reference`` and ``unfused`` on CPU (the reference's Philox4x32-10 runs in
int64 tensor arithmetic and loses to ``torch.randn``; the C++ ops are the fast CPU path);
``triton``, ``cuda`` and ``unfused`` on CUDA. A default provider that cannot run on the machine
(e.g. no compiler for ``cpp``) is left out with a note; see :func:`provider_problem`.

Shapes
------
A size ``x`` is the element count K·D of one search step's candidates: B = 1 row, K candidates,
each a latent of shape S = (16, H, W) (SD3's 16 latent channels), D = 16·H·W. H = W is the
largest power of two with H <= 128 and K = x // D >= 16; so 1M is K = 16 at (16, 64, 64) (SD3
at 512 px), 4M is K = 16 at (16, 128, 128) (1024 px), and larger sizes add candidates (64M is
K = 256). T = K // 4 elites. ``x`` in the results is the actual K·D: the requested size when
that is a power of two >= 256, else the largest such count below it. See :func:`case_shape`.

The latents (mean, z, v) use the configured dtype; rewards, mu and sigma are float32, as the
reward models and :func:`~smartgrpo_fast.ops.cem_update` produce them. Every row records the
dtype its op actually used.

Metrics
-------
Each (op, provider, size) gives a ``time`` row (ms: median, p20, p80 over the timed calls) and
a ``bandwidth`` row (GB/s). Bandwidth is the *minimum* bytes the fused op must move divided by
the time, for every provider, so they are comparable: e.g. sample_perturb reads mean, mu and
sigma (D each) and writes the K·D candidates; the unfused composition moves more than that and
its GB/s is an effective, not a physical, figure. Each (op, size) also gives ``speedup`` rows,
all from the one run: for every backend provider ``p``, ``unfused/p`` and (when ``reference``
ran) ``reference/p``, median time ratios with p20 = baseline p20 / p's p80 and p80 = baseline
p80 / p's p20 as conservative bounds.

Timing: on CUDA, CUDA events around each call, after warm-up calls (which also compile the
Triton kernels), with a 256 MiB buffer zeroed before each call to flush the L2 cache (what
``triton.testing.do_bench`` does); on CPU, ``time.perf_counter`` around each call after warm-up.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import torch

from smartgrpo_fast import __version__
from smartgrpo_fast.ops import (
    BACKEND_ENV,
    cem_update,
    resolve_backend,
    sample_perturb,
    topk_select,
    x0_estimate,
)

__all__ = [
    "BACKEND_PROVIDERS",
    "BASELINES",
    "CPU_PROVIDERS",
    "CPU_SIZES",
    "CSV_FIELDS",
    "CUDA_PROVIDERS",
    "CUDA_SIZES",
    "DTYPES",
    "MIN_SIZE",
    "OPS",
    "PROVIDERS",
    "CaseShape",
    "OpCase",
    "OpsBenchConfig",
    "RunInfo",
    "Timing",
    "build_case",
    "case_shape",
    "collect_run_info",
    "device_name",
    "forced_backend",
    "format_table",
    "git_commit",
    "measure",
    "measurement_rows",
    "parse_device",
    "plot_csv",
    "provider_problem",
    "quantile",
    "ratio_row",
    "read_csv",
    "run_ops_bench",
    "speedup_rows",
    "summarize",
    "write_csv",
    "write_json",
]

#: The benchmarked ops, in run order.
OPS: tuple[str, ...] = ("sample_perturb", "x0_estimate", "topk_select", "cem_update")
#: Providers that run the public op on one backend (``SMARTGRPO_BACKEND``).
BACKEND_PROVIDERS: tuple[str, ...] = ("cpp", "reference", "triton", "cuda")
#: Every provider: the backends, and ``unfused``, the PyTorch composition a user would write.
PROVIDERS: tuple[str, ...] = (*BACKEND_PROVIDERS, "unfused")
#: Default providers on CPU and on CUDA.
CPU_PROVIDERS: tuple[str, ...] = ("cpp", "reference", "unfused")
CUDA_PROVIDERS: tuple[str, ...] = ("triton", "cuda", "unfused")
#: The providers that speedups are taken against (``<baseline>/<provider>``), when they ran.
BASELINES: tuple[str, ...] = ("unfused", "reference")
#: dtype names accepted for the latents.
DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
)
#: Default sizes K·D on CPU and on CUDA.
CPU_SIZES: tuple[int, ...] = (2**16, 2**18, 2**20, 2**22, 2**24)
CUDA_SIZES: tuple[int, ...] = (2**20, 2**22, 2**24, 2**26)
#: Smallest size: 16 candidates of a (16, 1, 1) latent.
MIN_SIZE = 256

_CHANNELS = 16  # SD3 latent channels
_MAX_SIDE = 128  # SD3 latent side at 1024 px
_MIN_CANDIDATES = 16
_MODE = "forward"  # no autograd in any benchmarked call
_SD3_SCALING, _SD3_SHIFT = 1.5305, 0.0609  # the SD3 VAE's scaling and shift factors
_L2_FLUSH_BYTES = 256 * 2**20

#: Columns of the CSV (and keys of each JSON row), in order.
CSV_FIELDS: tuple[str, ...] = (
    "op",
    "provider",
    "mode",
    "metric",
    "unit",
    "x_name",
    "x",
    "k",
    "latent",
    "elites",
    "dtype",
    "median",
    "p20",
    "p80",
    "repeats",
    "device",
    "device_name",
    "torch_version",
    "smartgrpo_fast_version",
    "git_commit",
    "date",
)
_INT_FIELDS = ("x", "k", "elites", "repeats")
_FLOAT_FIELDS = ("median", "p20", "p80")


# --------------------------------------------------------------------------------------
# Configuration and shapes
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpsBenchConfig:
    """What the ops benchmark runs and how; :meth:`for_device` gives per-device defaults.

    Attributes:
        ops: op names from :data:`OPS`, in run order.
        providers: names from :data:`PROVIDERS`, in run order (no repeats).
        sizes: element counts K·D, each >= 256; see :func:`case_shape`.
        dtype: storage dtype of the latents: ``float32``, ``bfloat16`` or ``float16``.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        repeats: timed calls per measurement (>= 1).
        warmup: untimed calls before them (>= 0); on CUDA they also compile the kernels.
        seed: seed of the inputs and of the ops' noise stream, in [0, 2**63).
        validate: call the fused ops with ``validate=True`` (value checks that read the inputs
            and synchronise a CUDA stream) instead of the hot loop's ``validate=False``.
    """

    ops: tuple[str, ...] = OPS
    providers: tuple[str, ...] = CPU_PROVIDERS
    sizes: tuple[int, ...] = CPU_SIZES
    dtype: str = "float32"
    device: str = "cpu"
    repeats: int = 10
    warmup: int = 2
    seed: int = 0
    validate: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "ops", tuple(self.ops))
        object.__setattr__(self, "providers", tuple(self.providers))
        object.__setattr__(self, "sizes", tuple(self.sizes))
        if not self.ops:
            raise ValueError("ops: expected at least one op")
        for op in self.ops:
            if op not in OPS:
                raise ValueError(f"ops: expected names from {', '.join(OPS)}, got {op!r}")
        if not self.providers:
            raise ValueError("providers: expected at least one provider")
        for provider in self.providers:
            if provider not in PROVIDERS:
                raise ValueError(
                    f"providers: expected names from {', '.join(PROVIDERS)}, got {provider!r}"
                )
        if len(set(self.providers)) != len(self.providers):
            raise ValueError(f"providers: expected no repeats, got {self.providers}")
        if not self.sizes:
            raise ValueError("sizes: expected at least one size")
        for size in self.sizes:
            if isinstance(size, bool) or not isinstance(size, int) or size < MIN_SIZE:
                raise ValueError(f"sizes: expected ints >= {MIN_SIZE} (K·D elements), got {size!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        parse_device(self.device)
        for name, lo in (("repeats", 1), ("warmup", 0), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name}: expected an int >= {lo}, got {value!r}")
        if self.seed >= 2**63:
            raise ValueError(f"seed: expected an int < 2**63, got {self.seed}")

    @classmethod
    def for_device(cls, device: str, **overrides: Any) -> OpsBenchConfig:
        """Defaults for ``device``, then ``overrides`` (fields set to None are ignored).

        CPU: providers cpp, reference, unfused; sizes 64K to 16M; 10 repeats, 2 warm-ups.
        CUDA: providers triton, cuda, unfused; sizes 1M, 4M, 16M, 64M; 100 repeats, 10
        warm-ups. The default providers are not checked here: see :func:`provider_problem`.
        """
        on_cuda = parse_device(device).type == "cuda"
        defaults: dict[str, Any] = {
            "device": device,
            "providers": CUDA_PROVIDERS if on_cuda else CPU_PROVIDERS,
            "sizes": CUDA_SIZES if on_cuda else CPU_SIZES,
            "repeats": 100 if on_cuda else 10,
            "warmup": 10 if on_cuda else 2,
        }
        known = {f.name for f in fields(cls)}
        for name, value in overrides.items():
            if name not in known:
                raise TypeError(f"{name}: not a field of {cls.__name__}")
            if value is not None:
                defaults[name] = value
        return cls(**defaults)


def parse_device(device: str) -> torch.device:
    """``device`` as a torch.device; ValueError unless it is ``cpu``, ``cuda`` or ``cuda:N``."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected cpu, cuda or cuda:N, got {device!r}")
    return dev


@contextlib.contextmanager
def forced_backend(backend: str | None) -> Iterator[None]:
    """Set ``SMARTGRPO_BACKEND`` to ``backend`` inside the block (nothing when None), then
    restore it."""
    if backend is None:
        yield
        return
    previous = os.environ.get(BACKEND_ENV)
    os.environ[BACKEND_ENV] = backend
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(BACKEND_ENV, None)
        else:
            os.environ[BACKEND_ENV] = previous


def provider_problem(provider: str, device: torch.device | str) -> str | None:
    """Why ``provider`` cannot run on ``device`` (e.g. the C++ extension failed to build), or
    None when it can. Resolving ``cpp`` or ``cuda`` builds the extension on first use."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider: expected one of {', '.join(PROVIDERS)}, got {provider!r}")
    if provider == "unfused":
        return None
    with forced_backend(provider):
        try:
            resolve_backend(torch.device(device))
        except ValueError as err:
            return str(err)
    return None


@dataclass(frozen=True)
class CaseShape:
    """The tensors of one benchmark case: B rows, K candidates, latents S, T elites."""

    batch: int
    k: int
    latent: tuple[int, ...]
    elites: int

    @property
    def d(self) -> int:
        """D = prod(S), elements of one latent."""
        return math.prod(self.latent)

    @property
    def elements(self) -> int:
        """B·K·D, the size ``x`` of the case."""
        return self.batch * self.k * self.d

    @property
    def label(self) -> str:
        """``K×(C,H,W)``, e.g. ``16×(16,64,64)``."""
        return f"{self.k}×({','.join(str(s) for s in self.latent)})"


def case_shape(size: int) -> CaseShape:
    """The shape benchmarked at ``size`` elements (K·D, >= 256): see the module docstring.

    S = (16, H, H) with H the largest power of two <= 128 such that K = size // D >= 16;
    B = 1; T = K // 4.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < MIN_SIZE:
        raise ValueError(f"size: expected an int >= {MIN_SIZE} (K·D elements), got {size!r}")
    side = 1
    while side * 2 <= _MAX_SIDE and _CHANNELS * (2 * side) ** 2 * _MIN_CANDIDATES <= size:
        side *= 2
    latent = (_CHANNELS, side, side)
    k = size // math.prod(latent)
    return CaseShape(batch=1, k=k, latent=latent, elites=k // 4)


# --------------------------------------------------------------------------------------
# Cases: inputs, the two providers, the minimum bytes
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpCase:
    """One callable to time: ``fn()`` runs op ``op`` of ``provider`` on prepared inputs.

    ``dtype`` is the storage dtype of the op's main tensors; ``min_bytes`` the bytes the fused
    op must read and write at least (the numerator of every GB/s figure). ``fn`` must run with
    ``SMARTGRPO_BACKEND`` set to :attr:`backend` (see :func:`forced_backend`); :meth:`run`
    does that itself.
    """

    op: str
    provider: str
    shape: CaseShape
    dtype: torch.dtype
    device: torch.device
    fn: Callable[[], object]
    min_bytes: int

    @property
    def backend(self) -> str | None:
        """The ``SMARTGRPO_BACKEND`` the call needs: the provider, None for ``unfused``."""
        return None if self.provider == "unfused" else self.provider

    def run(self) -> object:
        """``fn()`` on :attr:`backend`, then wait for the device: one complete call, for
        wall-clock timers."""
        with forced_backend(self.backend):
            out = self.fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return out


def _generator(device: torch.device, seed: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def _cem_params(
    shape: CaseShape, device: torch.device, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element float32 mu (B, *S) and sigma (B, *S) > 0, as a CEM round leaves them."""
    full = (shape.batch, *shape.latent)
    mu = 0.1 * torch.randn(full, generator=gen, device=device)
    sigma = 0.75 + 0.5 * torch.rand(full, generator=gen, device=device)
    return mu, sigma


def _build_sample_perturb(
    shape: CaseShape,
    provider: str,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
    validate: bool,
) -> Callable[[], torch.Tensor]:
    """z: (B, K, *S) in ``dtype`` from mean (B, *S), mu and sigma (B, *S) f32, scale (B,)."""
    gen = _generator(device, seed)
    b, k, s = shape.batch, shape.k, shape.latent
    mean = torch.randn((b, *s), generator=gen, device=device).to(dtype)
    mu, sigma = _cem_params(shape, device, gen)
    scale = torch.full((b,), 0.3, device=device)
    if provider != "unfused":
        return lambda: sample_perturb(
            mean, mu, sigma, scale, k=k, seed=seed, round=0, validate=validate
        )
    noise_gen = _generator(device, seed + 1)
    scale5 = scale[:, None, None, None, None]

    def unfused() -> torch.Tensor:
        n = torch.randn((b, k, *s), generator=noise_gen, device=device)
        return (mean[:, None] + scale5 * (mu[:, None] + sigma[:, None] * n)).to(dtype)

    return unfused


def _build_x0_estimate(
    shape: CaseShape,
    provider: str,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
    validate: bool,
) -> Callable[[], torch.Tensor]:
    """x0: (B·K, *S) in ``dtype`` from z, v (B·K, *S) and a scalar flow time t."""
    gen = _generator(device, seed)
    full = (shape.batch * shape.k, *shape.latent)
    z = torch.randn(full, generator=gen, device=device).to(dtype)
    v = torch.randn(full, generator=gen, device=device).to(dtype)
    t, scaling, shift = 0.75, _SD3_SCALING, _SD3_SHIFT
    if provider != "unfused":
        return lambda: x0_estimate(z, v, t, scaling=scaling, shift=shift, validate=validate)
    return lambda: (z - t * v) / scaling + shift


def _build_topk_select(
    shape: CaseShape,
    provider: str,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
    validate: bool,
) -> Callable[[], torch.Tensor]:
    """idx: (B, T) int64 from float32 rewards r (B, K)."""
    gen = _generator(device, seed)
    r = torch.randn((shape.batch, shape.k), generator=gen, device=device)
    t = shape.elites
    if provider != "unfused":
        return lambda: topk_select(r, t)
    return lambda: torch.topk(torch.nan_to_num(r, nan=float("-inf")), t).indices


def _build_cem_update(
    shape: CaseShape,
    provider: str,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
    validate: bool,
) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """(mu_new, sigma_new): float32 (B, *S) each, from mu, sigma (B, *S) and elites (B, T)."""
    gen = _generator(device, seed)
    b, k, s = shape.batch, shape.k, shape.latent
    mu, sigma = _cem_params(shape, device, gen)
    elite_idx = torch.stack(
        [torch.randperm(k, generator=gen, device=device)[: shape.elites] for _ in range(b)]
    )
    if provider != "unfused":
        return lambda: cem_update(
            mu, sigma, elite_idx, shape=(b, *s), k=k, seed=seed, round=0, validate=validate
        )
    n = torch.randn((b, k, *s), generator=gen, device=device)  # kept from sampling, not timed
    rows = torch.arange(b, device=device)[:, None]

    def unfused() -> tuple[torch.Tensor, torch.Tensor]:
        eps = mu[:, None] + sigma[:, None] * n[rows, elite_idx]  # (B, T, *S)
        return eps.mean(dim=1), eps.std(dim=1, unbiased=False)

    return unfused


def _bytes_sample_perturb(shape: CaseShape, dtype: torch.dtype) -> int:
    """Read mean (D, dtype), mu and sigma (D, f32), scale (f32); write z (K·D, dtype)."""
    size = dtype.itemsize
    return shape.batch * (shape.d * size + 2 * shape.d * 4 + 4) + shape.elements * size


def _bytes_x0_estimate(shape: CaseShape, dtype: torch.dtype) -> int:
    """Read z and v, write x0: K·D each, in ``dtype``."""
    return 3 * shape.elements * dtype.itemsize


def _bytes_topk_select(shape: CaseShape, dtype: torch.dtype) -> int:
    """Read r (K, f32), write idx (T, int64)."""
    return shape.batch * (shape.k * 4 + shape.elites * 8)


def _bytes_cem_update(shape: CaseShape, dtype: torch.dtype) -> int:
    """Read mu, sigma and the elite indices; write mu and sigma (D each, f32): no K·D term."""
    return shape.batch * (4 * shape.d * 4 + shape.elites * 8)


@dataclass(frozen=True)
class _OpSpec:
    build: Callable[..., Callable[[], object]]
    min_bytes: Callable[[CaseShape, torch.dtype], int]
    latent_dtype: bool  # True: the op's tensors use the configured dtype; False: float32


_SPECS: Mapping[str, _OpSpec] = MappingProxyType(
    {
        "sample_perturb": _OpSpec(_build_sample_perturb, _bytes_sample_perturb, True),
        "x0_estimate": _OpSpec(_build_x0_estimate, _bytes_x0_estimate, True),
        "topk_select": _OpSpec(_build_topk_select, _bytes_topk_select, False),
        "cem_update": _OpSpec(_build_cem_update, _bytes_cem_update, False),
    }
)


def build_case(
    op: str,
    provider: str,
    size: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    validate: bool = False,
) -> OpCase:
    """Prepare the inputs of ``op`` at ``size`` elements (see :func:`case_shape`) on ``device``.

    Inputs are drawn from a generator seeded with ``seed``, so every provider sees the same
    tensors; the ops draw their noise with ``seed`` and round 0. Whether the provider can run
    on ``device`` is not checked (see :func:`provider_problem`).
    """
    if op not in _SPECS:
        raise ValueError(f"op: expected one of {', '.join(OPS)}, got {op!r}")
    if provider not in PROVIDERS:
        raise ValueError(f"provider: expected one of {', '.join(PROVIDERS)}, got {provider!r}")
    spec = _SPECS[op]
    device = torch.device(device)
    shape = case_shape(size)
    op_dtype = dtype if spec.latent_dtype else torch.float32
    fn = spec.build(shape, provider, op_dtype, device, seed, validate)
    return OpCase(op, provider, shape, op_dtype, device, fn, spec.min_bytes(shape, op_dtype))


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


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


def summarize(samples_ms: Sequence[float]) -> Timing:
    """Median, p20 and p80 of per-call times in ms."""
    return Timing(
        median=quantile(samples_ms, 0.5),
        p20=quantile(samples_ms, 0.2),
        p80=quantile(samples_ms, 0.8),
        samples=tuple(samples_ms),
    )


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
    """Time ``fn()``: CUDA events on CUDA devices, ``time.perf_counter`` elsewhere."""
    with torch.no_grad():
        if device.type == "cuda":
            samples = _time_cuda(fn, device, warmup=warmup, repeats=repeats)
        else:
            samples = _time_cpu(fn, warmup=warmup, repeats=repeats)
    return summarize(samples)


# --------------------------------------------------------------------------------------
# Run metadata and rows
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunInfo:
    """Where and with what a run was measured; copied into every row."""

    device: str
    device_name: str
    torch_version: str
    smartgrpo_fast_version: str
    git_commit: str
    date: str


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        if line.startswith("model name") and ":" in line:
            return line.split(":", 1)[1].strip()
    return ""


def device_name(device: torch.device) -> str:
    """The GPU's name on CUDA; the CPU model (or ``platform.processor()``, or ``cpu``) else."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_model() or platform.processor() or platform.machine() or "cpu"


def git_commit(path: Path | None = None) -> str:
    """Short commit of the git checkout holding ``path`` (default: this package), ``-dirty``
    when tracked files changed; ``unknown`` outside a checkout or without git."""
    cwd = path if path is not None else Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if head.returncode != 0 or not head.stdout.strip():
            return "unknown"
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    dirty = status.returncode == 0 and bool(status.stdout.strip())
    return head.stdout.strip() + ("-dirty" if dirty else "")


def collect_run_info(device: torch.device) -> RunInfo:
    """The metadata of a run on ``device``, dated now (UTC, ISO 8601)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return RunInfo(
        device=str(device),
        device_name=device_name(device),
        torch_version=torch.__version__,
        smartgrpo_fast_version=__version__,
        git_commit=git_commit(),
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def measurement_rows(case: OpCase, timing: Timing, info: RunInfo, repeats: int) -> list[dict]:
    """The ``time`` (ms) and ``bandwidth`` (GB/s, from the fused minimum bytes) rows."""
    base = {
        "op": case.op,
        "provider": case.provider,
        "mode": _MODE,
        "x_name": "K*D",
        "x": case.shape.elements,
        "k": case.shape.k,
        "latent": "x".join(str(s) for s in case.shape.latent),
        "elites": case.shape.elites,
        "dtype": _dtype_name(case.dtype),
        "repeats": repeats,
        **{f.name: getattr(info, f.name) for f in fields(info)},
    }
    nbytes = case.min_bytes
    time_row = {"metric": "time", "unit": "ms", "median": timing.median}
    time_row |= {"p20": timing.p20, "p80": timing.p80}
    bw_row = {"metric": "bandwidth", "unit": "GB/s", "median": _gbps(nbytes, timing.median)}
    # The slower call (p80 time) is the lower bandwidth (p20).
    bw_row |= {"p20": _gbps(nbytes, timing.p80), "p80": _gbps(nbytes, timing.p20)}
    return [_ordered(base | time_row), _ordered(base | bw_row)]


def _gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9 if ms > 0 else math.inf


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.inf


def _ordered(row: Mapping[str, Any]) -> dict:
    return {name: row[name] for name in CSV_FIELDS}


def ratio_row(row: Mapping[str, Any], base: Mapping[str, Any], unit: str) -> dict:
    """A ``speedup`` row: ``base``'s time over ``row``'s (> 1: ``row`` is faster); p20/p80 are
    the conservative bounds (base p20 / row p80, base p80 / row p20)."""
    ratios = {
        "median": _ratio(base["median"], row["median"]),
        "p20": _ratio(base["p20"], row["p80"]),
        "p80": _ratio(base["p80"], row["p20"]),
    }
    return {**row, "metric": "speedup", "unit": unit, **ratios}


def speedup_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """``speedup`` rows from the ``time`` rows of one run: for each (op, x, dtype), each
    baseline of :data:`BASELINES` that ran and each other backend provider ``p`` that ran, a row
    on provider ``p`` with unit ``<baseline>/<p>``: the median time ratio (> 1: ``p`` is faster),
    p20/p80 as conservative bounds. Rows follow the order of the time rows, baselines in
    :data:`BASELINES` order."""
    times = {(r["op"], r["x"], r["dtype"], r["provider"]): r for r in rows if r["metric"] == "time"}
    out = []
    for baseline in BASELINES:
        for (op, x, dtype, provider), row in times.items():
            base = times.get((op, x, dtype, baseline))
            if provider in ("unfused", baseline) or base is None:
                continue
            out.append(_ordered(ratio_row(row, base, f"{baseline}/{provider}")))
    return out


class _Job(NamedTuple):
    op: str
    size: int
    provider: str


def _with_progress(jobs: Sequence[_Job], enabled: bool) -> Iterator[_Job]:
    """Yield ``jobs``, reporting progress on stderr: a tqdm bar on a terminal when tqdm imports,
    else one line per job (readable in CI logs)."""
    if not enabled:
        yield from jobs
        return
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None or not sys.stderr.isatty():
        for i, job in enumerate(jobs, 1):
            print(f"[{i}/{len(jobs)}] {job.op} {job.provider} x={job.size}", file=sys.stderr)
            yield job
        return
    with tqdm(total=len(jobs), desc="bench ops", unit="case", file=sys.stderr) as bar:
        for job in jobs:
            bar.set_postfix_str(f"{job.op} {job.provider} x={job.size}")
            yield job
            bar.update(1)


def run_ops_bench(config: OpsBenchConfig, *, progress: bool = True) -> list[dict]:
    """Measure every (op, size, provider) of ``config``; return the rows (see CSV_FIELDS).

    Rows come op by op, size by size, provider by provider (time and bandwidth rows), then the
    speedup rows of all (op, size) at the end. Each backend provider is timed with
    ``SMARTGRPO_BACKEND`` set to it; a provider that cannot run here is a ValueError (see
    :func:`provider_problem`), raised before anything is timed.
    """
    device = parse_device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {config.device!r} requested but CUDA is not available")
    for provider in config.providers:
        problem = provider_problem(provider, device)
        if problem is not None:
            raise ValueError(f"providers: {provider} cannot run on {device}: {problem}")
    info = collect_run_info(device)
    dtype = DTYPES[config.dtype]
    jobs = [
        _Job(op, size, p) for op in config.ops for size in config.sizes for p in config.providers
    ]
    rows: list[dict] = []
    for job in _with_progress(jobs, progress):
        case = build_case(
            job.op,
            job.provider,
            job.size,
            dtype=dtype,
            device=device,
            seed=config.seed,
            validate=config.validate,
        )
        with forced_backend(case.backend):
            timing = measure(case.fn, device, warmup=config.warmup, repeats=config.repeats)
        rows += measurement_rows(case, timing, info, config.repeats)
    return rows + speedup_rows(rows)


# --------------------------------------------------------------------------------------
# Files, table, plot
# --------------------------------------------------------------------------------------


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path | str) -> Path:
    """Write ``rows`` to a CSV file with the :data:`CSV_FIELDS` header; return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({name: row[name] for name in CSV_FIELDS})
    return path


def _json_value(value: Any) -> Any:
    """Non-finite floats (a zero-time call's GB/s) become null: strict JSON has no Infinity."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_json(rows: Sequence[Mapping[str, Any]], path: Path | str) -> Path:
    """Write ``rows`` as a JSON list of objects with the :data:`CSV_FIELDS` keys."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = [{name: _json_value(row[name]) for name in CSV_FIELDS} for row in rows]
    path.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
    return path


def read_csv(path: Path | str) -> list[dict]:
    """Read rows written by :func:`write_csv`, numbers converted back to int/float."""
    with Path(path).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        for name in _INT_FIELDS:
            row[name] = int(row[name])
        for name in _FLOAT_FIELDS:
            row[name] = float(row[name])
    return rows


def _fmt(value: float | None) -> str:
    """Four significant digits (thousands grouped above 1000); ``-`` for a missing value."""
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def _in_order(values: Iterator[str], order: Sequence[str]) -> list[str]:
    """The distinct ``values``, known names in ``order`` first, then the others as they came."""
    seen = list(dict.fromkeys(values))
    return [v for v in order if v in seen] + [v for v in seen if v not in order]


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A text table: one line per (op, size, dtype) with each provider's median time, every
    speedup of the run (``<baseline>/<provider>``) and each provider's effective GB/s."""
    index = {(r["op"], r["x"], r["dtype"], r["provider"], r["metric"]): r for r in rows}
    keys = list(dict.fromkeys((r["op"], r["x"], r["dtype"]) for r in rows))
    providers = _in_order((r["provider"] for r in rows), PROVIDERS)
    units = list(dict.fromkeys(r["unit"] for r in rows if r["metric"] == "speedup"))
    header = (
        "op",
        "K·D",
        "K×(C,H,W)",
        "dtype",
        *(f"{p} ms" for p in providers),
        *units,
        *(f"{p} GB/s" for p in providers),
    )
    lines = [header]
    for op, x, dtype in keys:
        first = next(r for r in rows if (r["op"], r["x"], r["dtype"]) == (op, x, dtype))
        latent = first["latent"].replace("x", ",")
        median = {
            (provider, metric): row["median"]
            for (o, xx, dt, provider, metric), row in index.items()
            if (o, xx, dt) == (op, x, dtype)
        }
        speedups = {
            r["unit"]: r["median"]
            for r in rows
            if r["metric"] == "speedup" and (r["op"], r["x"], r["dtype"]) == (op, x, dtype)
        }
        lines.append(
            (
                op,
                f"{x:,}",
                f"{first['k']}×({latent})",
                dtype,
                *(_fmt(median.get((p, "time"))) for p in providers),
                *("-" if u not in speedups else f"{speedups[u]:.3g}x" for u in units),
                *(_fmt(median.get((p, "bandwidth"))) for p in providers),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    left = {0, 2, 3}
    text = [
        "  ".join(
            cell.ljust(w) if i in left else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def plot_csv(csv_path: Path | str, png_path: Path | str | None = None) -> Path:
    """Plot median time (p20-p80 band) vs K·D from a CSV of :func:`write_csv`, one subplot per
    op, one line per provider, log-log; write a PNG (default: the CSV's path with ``.png``).

    Needs matplotlib (``pip install smartgrpo-fast[bench]``); uses the Agg canvas, not pyplot,
    so no global backend is touched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    csv_path = Path(csv_path)
    png_path = Path(png_path) if png_path is not None else csv_path.with_suffix(".png")
    rows = [r for r in read_csv(csv_path) if r["metric"] == "time"]
    if not rows:
        raise ValueError(f"{csv_path}: no 'time' rows to plot")
    ops = list(dict.fromkeys(r["op"] for r in rows))
    providers = _in_order((r["provider"] for r in rows), PROVIDERS)
    ncols = min(2, len(ops))
    nrows = math.ceil(len(ops) / ncols)
    fig = Figure(figsize=(6.0 * ncols, 4.2 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, op in zip(axes, ops, strict=False):
        for provider in providers:
            pts = sorted(
                (r["x"], r["median"], r["p20"], r["p80"], r["dtype"])
                for r in rows
                if r["op"] == op and r["provider"] == provider
            )
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ax.plot(xs, [p[1] for p in pts], marker="o", label=f"{provider} ({pts[0][4]})")
            ax.fill_between(xs, [p[2] for p in pts], [p[3] for p in pts], alpha=0.25)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(op)
        ax.set_xlabel("K·D elements")
        ax.set_ylabel("time (ms), median, p20-p80")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    for ax in axes[len(ops) :]:
        ax.set_visible(False)
    first = rows[0]
    fig.suptitle(
        f"smartgrpo_fast {first['smartgrpo_fast_version']} ops on {first['device_name']} "
        f"(torch {first['torch_version']}, {first['git_commit']}, {first['date']})",
        fontsize=9,
    )
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    return png_path
