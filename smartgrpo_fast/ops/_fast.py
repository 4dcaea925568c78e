"""The eager fast path of the fused ops: a call with ``validate=False`` pays only for its work.

A public op called eagerly with ``validate=False`` looks up a *plan* keyed by everything that
decides whether its arguments are valid and how they reach the kernel: ``SMARTGRPO_BACKEND``,
grad mode, and each argument's *form* (:func:`form`: a tensor's shape, strides, dtype, device
and ``requires_grad``; a Python value's type; ints that fix shapes, such as ``k``, by value).
The first call of a key runs the op's full argument checks (a bad argument raises exactly as
on the slow path, and nothing is cached) and builds the plan: the resolved backend and how each
argument is passed. Later calls of the key only check the values that no key holds — Python
floats finite and in range, int seeds, rounds and row offsets in range (a value out of range
sends the call down the slow path, which raises the usual error) — and run the plan: no
argument normalisation, no torch.library dispatch (the operator stays what ``torch.compile``
traces and what ``validate=True`` calls), no allocation besides the outputs.

The C++ ops take (B, *S) tensors as they are (``strided`` in ``csrc/ops_cpu.cpp`` views them as
(B, D)), so a plan for the ``cpp`` backend makes no view either, and with int seeds it calls the
``.packed`` overloads (the scalars in two lists: 7 or 8 arguments instead of 15 or 19, each of
which costs the dispatcher's Python-to-C++ conversion) through the overload's C++ callable
(:func:`direct`). Plans of the other backends (Triton, CUDA C++, the reference) call the same
backend function the operator calls, minus the dispatch. A plan never holds a tensor: only
forms, ints and functions.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Hashable

import torch

from smartgrpo_fast.ops._common import BACKEND_ENV

__all__ = [
    "MISSING",
    "PLAN_LIMIT",
    "U32",
    "U64",
    "PlanCache",
    "backend_env",
    "direct",
    "form",
    "int_ok",
    "int_words",
    "number_ok",
    "seed_words",
]

#: Plans kept per op; the cache is emptied when it would grow past this (a program that keeps
#: changing shapes pays the slow path's cost, never unbounded memory).
PLAN_LIMIT = 256

U64 = 2**64
U32 = 2**32
#: What :meth:`PlanCache.lookup` returns for a key with no plan yet.
MISSING = object()


try:  # os.environ.get costs ~0.6 us a call: read its underlying dict (CPython, POSIX and Windows)
    _ENV_DATA = os.environ._data  # type: ignore[attr-defined]
    _ENV_KEY = os.environ.encodekey(BACKEND_ENV)  # type: ignore[attr-defined]
except AttributeError:  # pragma: no cover - another Python
    _ENV_DATA, _ENV_KEY = None, None


def backend_env() -> object:
    """``SMARTGRPO_BACKEND`` as the environment holds it now (encoded), None when unset: a
    part of every plan key, read at every call, so that setting the variable takes effect."""
    if _ENV_DATA is None:  # pragma: no cover
        return os.environ.get(BACKEND_ENV)
    return _ENV_DATA.get(_ENV_KEY)


def direct(op: object) -> Callable[..., object]:
    """The C++ callable behind an ``OpOverload`` (``op._op``): the same dispatch without the
    Python frame of ``OpOverload.__call__``; the overload itself where torch has no ``_op``."""
    return getattr(op, "_op", op)


def form(x: object) -> Hashable:
    """The part of an argument that a plan depends on: a tensor's (shape, strides, dtype,
    device, requires_grad), else the value's type (bool, int and float are distinct)."""
    if isinstance(x, torch.Tensor):
        return (x.shape, x.stride(), x.dtype, x.device, x.requires_grad)
    return x.__class__


def number_ok(x: object, *, nonnegative: bool = False) -> bool:
    """A float-or-tensor parameter's per-call check: True for a tensor (its values are checked
    only with ``validate=True``) or a finite number (``>= 0`` when ``nonnegative``)."""
    if isinstance(x, torch.Tensor):
        return True
    v = float(x)  # the plan's key says x is an int or a float
    return math.isfinite(v) and (v >= 0 or not nonnegative)


def int_ok(x: object, hi: int) -> bool:
    """A seed's, round's or row offset's per-call check: a tensor, or an int in [0, hi)."""
    return isinstance(x, torch.Tensor) or 0 <= x < hi


def seed_words(seed: int | torch.Tensor) -> tuple[torch.Tensor | None, int, int]:
    """``(seed_t, lo, hi)`` operator arguments of a checked seed."""
    if isinstance(seed, torch.Tensor):
        return seed, 0, 0
    return None, seed & 0xFFFFFFFF, seed >> 32


def int_words(x: int | torch.Tensor) -> tuple[torch.Tensor | None, int]:
    """``(x_t, x)`` operator arguments of a checked round or row offset."""
    if isinstance(x, torch.Tensor):
        return x, 0
    return None, x


class PlanCache:
    """Plans of one op: ``lookup(key)`` gives the plan, None (a key the fast path does not
    serve, e.g. x0_estimate under autograd) or :data:`MISSING`; ``put(key, plan)``."""

    def __init__(self) -> None:
        self._plans: dict[Hashable, Callable[..., object] | None] = {}

    def lookup(self, key: Hashable) -> object:
        return self._plans.get(key, MISSING)

    def put(self, key: Hashable, plan: Callable[..., object] | None) -> None:
        if len(self._plans) >= PLAN_LIMIT:
            self._plans.clear()
        self._plans[key] = plan

    def clear(self) -> None:
        self._plans.clear()

    def __len__(self) -> int:
        return len(self._plans)
