"""Optional Triton import and interpreter detection.

Triton is a Linux dependency; elsewhere the ops run their PyTorch references and the
kernels are simply not defined. ``TRITON_INTERPRET=1`` must be set before triton is first
imported for ``@triton.jit`` to build interpreted kernels that run on CPU tensors.
"""

from __future__ import annotations

import os

try:  # pragma: no cover - exercised implicitly on every platform
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "block_size", "interpreting", "next_power_of_2", "tl", "triton"]


def interpreting() -> bool:
    """True when Triton kernels run through the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= max(n, 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def block_size(numel: int, gpu_cap: int) -> int:
    """Elements per program: the power of two covering ``numel``, at least 16 and at most
    ``gpu_cap`` — or 65536 under the interpreter, whose per-program overhead dominates."""
    cap = 65536 if interpreting() else gpu_cap
    return max(16, min(next_power_of_2(numel), cap))
