"""The torch.library registration of the fused ops: what ``torch.compile`` traces.

Each public op (``sample_perturb``, ``x0_estimate``, ``topk_select``, ``cem_update``,
``philox_normal``) validates its arguments in Python (eagerly only: validation is skipped while
``torch.compile`` traces, see :func:`compiling`) and then calls a custom operator whose
arguments are tensors, ints, floats, bools (and a device):

* a float-or-tensor parameter is a pair ``(Tensor? x, float x_val)``: ``None`` and the value
  for a Python number, a (B,) tensor for one value per row (a 0-d tensor is expanded to (B,)),
  a (B, D) view for one value per element (see :func:`param_arg`);
* a seed is ``(Tensor? seed_t, int seed_lo, int seed_hi)``, a round or a row offset
  ``(Tensor? x_t, int x)``: the 0-d int64 tensor when one was given (read inside the kernel,
  so CUDA graphs and compiled graphs see in-place updates), else the int (the seed split into
  its two 32-bit words, as the C++ schemas of ``csrc/ops_cpu.cpp`` take it).

Two operators per op:

* ``smartgrpo_fast::<op>`` (defined by :func:`define_op`: an explicit schema, one
  ``CompositeExplicitAutograd`` kernel for every device, a fake kernel): resolves the backend
  when it runs (:func:`~smartgrpo_fast.ops.resolve_backend`) and runs the reference, the C++
  ops ``smartgrpo_fast::<op>_out`` (their fake kernels are registered here once the library is
  loaded), or the Triton kernel. Eager calls take it, except those of ``sample_perturb``,
  ``cem_update`` and ``x0_estimate`` with ``validate=False``, which run a cached plan that calls
  the same backend without this dispatch (:mod:`smartgrpo_fast.ops._fast`); in a compiled graph
  it is opaque and still picks the backend at run time. (Not :func:`torch.library.custom_op`:
  its Python autograd and aliasing layers cost about 40 us a call on a 2-core CPU, this
  dispatch about 12 us; x0_estimate's Python autograd kernel adds about 12 us more.)
* ``smartgrpo_fast::<op>_triton`` (:func:`torch.library.triton_op`, defined where triton is
  importable): the Triton kernel launched through :func:`torch.library.wrap_triton`, so
  Inductor sees the kernel and compiles it into the graph. ``torch.compile`` traces a call to
  it when the backend resolved at trace time is ``triton`` and Triton compiles (not under
  ``TRITON_INTERPRET=1``), see :func:`trace_triton`: such a graph keeps the Triton kernel even
  if ``SMARTGRPO_BACKEND`` changes later.

``x0_estimate``'s operators are differentiable (``register_autograd``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from smartgrpo_fast.ops._common import Mode, Param, op_backend
from smartgrpo_fast.ops._triton import interpreting

__all__ = [
    "LIB",
    "NAMESPACE",
    "compiling",
    "define_op",
    "int_arg",
    "int_of",
    "kernel",
    "param_arg",
    "param_of",
    "register_cpp_fakes",
    "seed_arg",
    "seed_of",
    "trace_triton",
]

#: The operator namespace: ``torch.ops.smartgrpo_fast.*`` (shared with the C++ ops).
NAMESPACE = "smartgrpo_fast"
#: The registrations made from Python (a fragment of the namespace the C++ library defines).
LIB = torch.library.Library(NAMESPACE, "FRAGMENT")


def define_op(schema: str, impl: Callable[..., object], fake: Callable[..., object]) -> None:
    """Define ``smartgrpo_fast::<schema>`` with ``impl`` as its kernel on every device
    (``CompositeExplicitAutograd``: not differentiable unless an autograd formula is registered)
    and ``fake`` as its fake (meta) kernel: output shapes, dtypes and strides."""
    name = schema.split("(", 1)[0]
    LIB.define(schema)
    LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=LIB)


def compiling() -> bool:
    """True while ``torch.compile`` (dynamo) traces: the ops then skip argument validation."""
    return torch.compiler.is_compiling()


@torch.compiler.assume_constant_result
def trace_triton(device: torch.device, implemented: tuple[str, ...]) -> bool:
    """Whether ``torch.compile`` traces an op's Triton operator ``<op>_triton``: the backend
    (:func:`~smartgrpo_fast.ops._common.op_backend` of ``implemented``) is ``triton`` and the
    kernels are compiled, not interpreted (``wrap_triton`` cannot trace the interpreter's
    kernels, so under ``TRITON_INTERPRET=1`` the graph holds the opaque operator, which runs the
    interpreted kernel). Evaluated once per trace: a constant of the graph."""
    return op_backend(device, implemented) == "triton" and not interpreting()


def kernel(fn: object, wrap: bool) -> object:
    """A Triton kernel to launch: through :func:`torch.library.wrap_triton` inside a
    ``triton_op`` (so that tracing records it), else the plain ``@triton.jit`` function."""
    return torch.library.wrap_triton(fn) if wrap else fn


def param_arg(x: float | torch.Tensor, batch: int, inner: tuple[int, ...]) -> tuple:
    """``(tensor, value)`` operator arguments of a float-or-tensor parameter of rows ``batch``
    and trailing shape ``inner`` (already validated by ``normalize_param`` when eager).

    ``(None, float(x))`` for a number; ``(x.expand(B), 0.0)`` for a 0-d tensor; ``(x, 0.0)``
    for a (B,) tensor; else the (B, D) view of ``x`` broadcast to (B, *inner) (float64 read as
    float32). Traceable by dynamo (no value is read).
    """
    if not isinstance(x, torch.Tensor):
        return None, float(x)
    if x.dim() == 0:
        return x.reshape(1).expand(batch), 0.0
    if x.dim() == 1 and x.shape[0] == batch:
        return x, 0.0
    x2 = x.expand(batch, *inner).reshape(batch, math.prod(inner))
    if x2.dtype == torch.float64:
        x2 = x2.float()
    return x2, 0.0


def param_of(x: torch.Tensor | None, value: float) -> Param:
    """The :class:`Param` of the operator arguments ``(x, value)`` (see :func:`param_arg`)."""
    if x is None:
        return Param(Mode.SCALAR, value=float(value))
    if x.dim() == 1:
        return Param(Mode.ROW, tensor=x, stride_b=x.stride(0))
    return Param(Mode.ELEM, tensor=x, stride_b=x.stride(0), stride_e=x.stride(1))


def seed_arg(seed: int | torch.Tensor) -> tuple:
    """``(seed_t, seed_lo, seed_hi)``: the 0-d tensor and two zeros, or None and the two
    32-bit words of an int seed in [0, 2**64)."""
    if isinstance(seed, torch.Tensor):
        return seed, 0, 0
    s = int(seed) % 2**64
    return None, s & 0xFFFFFFFF, s >> 32


def seed_of(seed_t: torch.Tensor | None, lo: int, hi: int) -> int | torch.Tensor:
    """The seed of the operator arguments: the tensor, or the int ``lo + 2**32 hi``."""
    return seed_t if seed_t is not None else int(lo) | (int(hi) << 32)


def int_arg(x: int | torch.Tensor) -> tuple:
    """``(x_t, x)``: the 0-d tensor and 0, or None and the int (a round or a row offset)."""
    if isinstance(x, torch.Tensor):
        return x, 0
    return None, int(x)


def int_of(x_t: torch.Tensor | None, x: int) -> int | torch.Tensor:
    """The round or row offset of the operator arguments ``(x_t, x)``."""
    return x_t if x_t is not None else int(x)


def _no_output(*args: object) -> None:
    """Fake kernel of the C++ ``*_out`` ops: they only write outputs the caller allocated."""
    return None


_CPP_OPS = ("philox_bits_out", "philox_normal_out", "sample_perturb_out", "x0_estimate_out",
            "cem_update_out", "sample_perturb_out.packed", "cem_update_out.packed",
            "topk_select_out")  # fmt: skip
_cpp_fakes: list[bool] = []


def register_cpp_fakes() -> None:
    """Register fake (meta) kernels for the C++ ops once their library is loaded, so that a
    traced graph can hold them (``torch.compile``, ``opcheck``). Idempotent."""
    if _cpp_fakes:
        return
    for name in _CPP_OPS:
        torch.library.register_fake(f"{NAMESPACE}::{name}", _no_output, lib=LIB)
    _cpp_fakes.append(True)
