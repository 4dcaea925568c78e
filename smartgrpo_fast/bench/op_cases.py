"""The ops benchmark's cases: the inputs of each fused op at a size, on a device, and the
minimum bytes the op must move; one callable per (op, provider, size).

Providers
---------
* ``cpp``, ``reference``, ``triton``, ``cuda``: the public op
  (:func:`~smartgrpo_fast.ops.sample_perturb`, ...) with ``SMARTGRPO_BACKEND`` set to that
  backend for the measurement: the compiled C++ ops (CPU), the PyTorch reference, the Triton
  kernels (CUDA), the CUDA C++ ops. An op without a version for a backend runs what that backend
  falls back to (topk_select and x0_estimate: Triton under ``cuda``). The ops are called with
  ``validate=False``, as in the search's hot loop (value checks read the tensors and
  synchronise a CUDA stream), unless :func:`build_case` gets ``validate=True``.
* ``unfused``: the plain PyTorch a user would write without the library:

  - sample_perturb: ``n = torch.randn(B, K, *S)`` materialised, then
    ``mean[:, None] + scale[:, None, None, None, None] * (mu[:, None] + sigma[:, None] * n)``
    (on CUDA from the default generator, which a CUDA graph can capture);
  - x0_estimate: ``(z - t * v) / scaling + shift`` as separate torch ops;
  - topk_select: ``torch.topk(torch.nan_to_num(r, nan=-inf), T).indices``;
  - cem_update: the elites gathered from the (B, K, *S) noise ``n`` kept from sampling
    (allocated once, outside the timed call), ``eps = mu + sigma * n_elite``, then the mean and
    the population std (``unbiased=False``) over the elites.

Shapes
------
A size ``x`` is the element count K·D of one search step's candidates: B = 1 row, K candidates,
each a latent of shape S = (16, H, W) (SD3's 16 latent channels), D = 16·H·W. H = W is the
largest power of two with H <= 128 and K = x // D >= 16; so 1M is K = 16 at (16, 64, 64) (SD3
at 512 px), 4M is K = 16 at (16, 128, 128) (1024 px), and larger sizes add candidates (64M is
K = 256). T = K // 4 elites. ``x`` in the results is the actual K·D: the requested size when
that is a power of two >= 256, else the largest such count below it. See :func:`case_shape`.

The host case (:func:`build_host_case`) is one tiny call instead: B = 1, K = 4, S = (4, 8, 8),
T = 2, so that the time is the library's own host work; its baseline
(:func:`host_baseline`) is one ``torch.add`` of the (1, 4, 4, 8, 8) tensor to itself.

The latents (mean, z, v) use the configured dtype; rewards, mu and sigma are float32, as the
reward models and :func:`~smartgrpo_fast.ops.cem_update` produce them. Every row records the
dtype its op actually used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

import torch

from smartgrpo_fast.bench.case import CaseShape, OpCase, forced_backend
from smartgrpo_fast.ops import (
    cem_update,
    resolve_backend,
    sample_perturb,
    topk_select,
    x0_estimate,
)

__all__ = [
    "BACKEND_PROVIDERS",
    "HOST_SHAPE",
    "MIN_SIZE",
    "OPS",
    "PROVIDERS",
    "build_case",
    "build_host_case",
    "case_shape",
    "host_baseline",
    "provider_problem",
]

#: The benchmarked ops, in run order.
OPS: tuple[str, ...] = ("sample_perturb", "x0_estimate", "topk_select", "cem_update")
#: Providers that run the public op on one backend (``SMARTGRPO_BACKEND``).
BACKEND_PROVIDERS: tuple[str, ...] = ("cpp", "reference", "triton", "cuda")
#: Every provider: the backends, and ``unfused``, the PyTorch composition a user would write.
PROVIDERS: tuple[str, ...] = (*BACKEND_PROVIDERS, "unfused")
#: Smallest size: 16 candidates of a (16, 1, 1) latent.
MIN_SIZE = 256
#: The host case: one row, 4 candidates of a (4, 8, 8) latent, 2 elites (1,024 elements).
HOST_SHAPE = CaseShape(batch=1, k=4, latent=(4, 8, 8), elites=2)

_CHANNELS = 16  # SD3 latent channels
_MAX_SIDE = 128  # SD3 latent side at 1024 px
_MIN_CANDIDATES = 16
_SD3_SCALING, _SD3_SHIFT = 1.5305, 0.0609  # the SD3 VAE's scaling and shift factors


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


class _Request(NamedTuple):
    """What a builder prepares: the case's shape, its provider, the op's dtype and device, the
    seed of the inputs and of the op's noise, and whether the op validates its inputs."""

    shape: CaseShape
    provider: str
    dtype: torch.dtype
    device: torch.device
    seed: int
    validate: bool

    @property
    def fused(self) -> bool:
        """True for a backend provider (the library's op), False for ``unfused``."""
        return self.provider != "unfused"

    def generator(self, offset: int = 0) -> torch.Generator:
        """A generator on the device, seeded with ``seed + offset``."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.seed + offset)
        return gen


def _cem_params(req: _Request, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element float32 mu (B, *S) and sigma (B, *S) > 0, as a CEM round leaves them."""
    full = (req.shape.batch, *req.shape.latent)
    mu = 0.1 * torch.randn(full, generator=gen, device=req.device)
    sigma = 0.75 + 0.5 * torch.rand(full, generator=gen, device=req.device)
    return mu, sigma


def _build_sample_perturb(req: _Request) -> Callable[[], torch.Tensor]:
    """z: (B, K, *S) in ``dtype`` from mean (B, *S), mu and sigma (B, *S) f32, scale (B,)."""
    gen, device, dtype = req.generator(), req.device, req.dtype
    b, k, s = req.shape.batch, req.shape.k, req.shape.latent
    mean = torch.randn((b, *s), generator=gen, device=device).to(dtype)
    mu, sigma = _cem_params(req, gen)
    scale = torch.full((b,), 0.3, device=device)
    if req.fused:
        return lambda: sample_perturb(
            mean, mu, sigma, scale, k=k, seed=req.seed, round=0, validate=req.validate
        )
    # CUDA: the default generator, which graph capture handles (a private one it refuses)
    noise_gen = req.generator(offset=1) if device.type != "cuda" else None
    scale5 = scale[:, None, None, None, None]

    def unfused() -> torch.Tensor:
        n = torch.randn((b, k, *s), generator=noise_gen, device=device)
        return (mean[:, None] + scale5 * (mu[:, None] + sigma[:, None] * n)).to(dtype)

    return unfused


def _build_x0_estimate(req: _Request) -> Callable[[], torch.Tensor]:
    """x0: (B·K, *S) in ``dtype`` from z, v (B·K, *S) and a scalar flow time t."""
    gen = req.generator()
    full = (req.shape.batch * req.shape.k, *req.shape.latent)
    z = torch.randn(full, generator=gen, device=req.device).to(req.dtype)
    v = torch.randn(full, generator=gen, device=req.device).to(req.dtype)
    t, scaling, shift = 0.75, _SD3_SCALING, _SD3_SHIFT
    if req.fused:
        return lambda: x0_estimate(z, v, t, scaling=scaling, shift=shift, validate=req.validate)
    return lambda: (z - t * v) / scaling + shift


def _build_topk_select(req: _Request) -> Callable[[], torch.Tensor]:
    """idx: (B, T) int64 from float32 rewards r (B, K)."""
    r = torch.randn((req.shape.batch, req.shape.k), generator=req.generator(), device=req.device)
    t = req.shape.elites
    if req.fused:
        return lambda: topk_select(r, t, validate=req.validate)
    return lambda: torch.topk(torch.nan_to_num(r, nan=float("-inf")), t).indices


def _build_cem_update(req: _Request) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """(mu_new, sigma_new): float32 (B, *S) each, from mu, sigma (B, *S) and elites (B, T)."""
    gen, device = req.generator(), req.device
    b, k, s = req.shape.batch, req.shape.k, req.shape.latent
    mu, sigma = _cem_params(req, gen)
    elite_idx = torch.stack(
        [torch.randperm(k, generator=gen, device=device)[: req.shape.elites] for _ in range(b)]
    )
    if req.fused:
        return lambda: cem_update(
            mu, sigma, elite_idx, shape=(b, *s), k=k, seed=req.seed, round=0, validate=req.validate
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
    build: Callable[[_Request], Callable[[], object]]
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


def _check_op_provider(op: str, provider: str) -> None:
    """A ValueError naming ``op`` or ``provider`` when either is not one of the benchmark's."""
    if op not in _SPECS:
        raise ValueError(f"op: expected one of {', '.join(OPS)}, got {op!r}")
    if provider not in PROVIDERS:
        raise ValueError(f"provider: expected one of {', '.join(PROVIDERS)}, got {provider!r}")


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
    _check_op_provider(op, provider)
    return _build(op, provider, case_shape(size), dtype, device, seed, validate)


def build_host_case(
    op: str,
    provider: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    validate: bool = False,
) -> OpCase:
    """The host case of ``op``: :data:`HOST_SHAPE`, otherwise as :func:`build_case`."""
    _check_op_provider(op, provider)
    return _build(op, provider, HOST_SHAPE, dtype, device, seed, validate)


def host_baseline(
    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> Callable[[], torch.Tensor]:
    """One ``torch.add`` of a (1, 4, 4, 8, 8) tensor to itself: the host cases' yardstick."""
    x = torch.ones((HOST_SHAPE.batch, HOST_SHAPE.k, *HOST_SHAPE.latent), dtype=dtype,
                   device=torch.device(device))  # fmt: skip
    return lambda: torch.add(x, x)


def _build(
    op: str,
    provider: str,
    shape: CaseShape,
    dtype: torch.dtype,
    device: torch.device | str,
    seed: int,
    validate: bool,
) -> OpCase:
    spec = _SPECS[op]
    device = torch.device(device)
    op_dtype = dtype if spec.latent_dtype else torch.float32
    fn = spec.build(_Request(shape, provider, op_dtype, device, seed, validate))
    nbytes = spec.min_bytes(shape, op_dtype)
    backend = None if provider == "unfused" else provider
    return OpCase(op, provider, shape, op_dtype, device, fn, nbytes, backend=backend)
