"""What a benchmark times: one case (a callable on prepared inputs), its shape, device and dtype.

Every suite describes its measurements with :class:`CaseShape` (B rows, K candidates, latents
S, T elites) and :class:`OpCase`, so that :func:`smartgrpo_fast.bench.rows.measurement_rows`
writes them in the one CSV schema.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

from smartgrpo_fast.bench.timing import synchronize
from smartgrpo_fast.ops import BACKEND_ENV

__all__ = ["DTYPES", "CaseShape", "OpCase", "dtype_name", "forced_backend", "parse_device"]

#: dtype names accepted for the latents and models.
DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
)


def dtype_name(dtype: torch.dtype) -> str:
    """``float32`` for ``torch.float32``: the dtype as the rows name it."""
    return str(dtype).removeprefix("torch.")


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


@dataclass(frozen=True)
class OpCase:
    """One callable to time: ``fn()`` runs op ``op`` of ``provider`` on prepared inputs.

    ``dtype`` is the storage dtype of the op's main tensors; ``min_bytes`` the bytes the op
    must read and write at least (the numerator of every GB/s figure; 0 when not modelled).
    ``fn`` must run with ``SMARTGRPO_BACKEND`` set to :attr:`backend` when that is not None
    (see :func:`forced_backend`); :meth:`run` does that itself.
    """

    op: str
    provider: str
    shape: CaseShape
    dtype: torch.dtype
    device: torch.device
    fn: Callable[[], object]
    min_bytes: int
    backend: str | None = None

    def run(self) -> object:
        """``fn()`` on :attr:`backend`, then wait for the device: one complete call, for
        wall-clock timers."""
        with forced_backend(self.backend):
            out = self.fn()
        synchronize(self.device)
        return out
