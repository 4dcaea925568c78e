"""Optional Triton import and interpreter detection.

Triton is a Linux dependency; elsewhere the ops run their PyTorch references and the
kernels are simply not defined. ``TRITON_INTERPRET=1`` must be set before triton is first
imported for ``@triton.jit`` to build interpreted kernels that run on CPU tensors.

Under the interpreter a program's overhead dominates, so :func:`block_size` gives each
program up to 65536 elements: every test-sized row is then one block. To run the paths a GPU
takes with several blocks per row (block offsets, Philox counters across blocks, the pooled
cross-block reduction of ``cem_update``), set ``SMARTGRPO_INTERPRET_BLOCK`` to a smaller power
of two (>= 16), e.g. ``SMARTGRPO_INTERPRET_BLOCK=1024``; it is read at every launch, so a test
can set it with ``monkeypatch.setenv``.
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

__all__ = [
    "HAS_TRITON",
    "INTERPRET_BLOCK_ENV",
    "block_size",
    "interpret_block_cap",
    "interpreting",
    "next_power_of_2",
    "tl",
    "triton",
]

#: Environment variable: the most elements per program under the interpreter (default 65536).
INTERPRET_BLOCK_ENV = "SMARTGRPO_INTERPRET_BLOCK"
_INTERPRET_BLOCK_DEFAULT = 65536


def interpreting() -> bool:
    """True when Triton kernels run through the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= max(n, 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def interpret_block_cap() -> int:
    """The most elements per program under the interpreter: ``$SMARTGRPO_INTERPRET_BLOCK``
    (a power of two >= 16, read at every call), else 65536."""
    raw = os.environ.get(INTERPRET_BLOCK_ENV, "").strip()
    if not raw:
        return _INTERPRET_BLOCK_DEFAULT
    try:
        cap = int(raw)
    except ValueError:
        cap = 0
    if cap < 16 or cap & (cap - 1):
        raise ValueError(f"{INTERPRET_BLOCK_ENV}: expected a power of two >= 16, got {raw!r}")
    return cap


def block_size(numel: int, gpu_cap: int) -> int:
    """Elements per program: the power of two covering ``numel``, at least 16 and at most
    ``gpu_cap`` — or, under the interpreter, whose per-program overhead dominates, at most
    :func:`interpret_block_cap` (65536 unless ``SMARTGRPO_INTERPRET_BLOCK`` says otherwise)."""
    cap = interpret_block_cap() if interpreting() else gpu_cap
    return max(16, min(next_power_of_2(numel), cap))
