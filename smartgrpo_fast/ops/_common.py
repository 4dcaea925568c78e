"""Validation, argument normalisation and backend dispatch shared by the fused ops.

Every op validates its arguments here before it touches a kernel, and every
error names the argument, what it got (shape, dtype, device or value) and what
was expected. Arguments that may be either a Python number or a tensor are
normalised into a :class:`Param`, the one form the kernels and references read:

* ``SCALAR``: one Python float for every row and element (``value``);
* ``ROW``: one value per row ``b`` at ``tensor[b * stride_b]``;
* ``ELEM``: one value per (row, element) at ``tensor[b * stride_b + e * stride_e]``.

Strides are kept rather than copied away, so broadcast (expanded) and row-sliced
inputs cost no copy.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from enum import IntEnum

import torch

from smartgrpo_fast.devices import is_capturing, same_device

__all__ = [
    "BACKEND_ENV",
    "FLOAT_DTYPES",
    "Mode",
    "Param",
    "alloc",
    "check_finite_values",
    "check_float_tensor",
    "check_no_grad",
    "check_round",
    "check_row_offset",
    "check_same_device",
    "check_seed",
    "check_shape",
    "check_stream_limits",
    "describe",
    "is_capturing",
    "normalize_param",
    "op_backend",
    "resolve_backend",
    "rows_view",
]

#: dtypes the ops accept for floating-point tensors (storage dtype; math is float32).
FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)

#: Environment variable that forces a backend: ``auto`` (default), ``reference``, ``cpp``,
#: ``triton`` or ``cuda`` (see :func:`resolve_backend`).
BACKEND_ENV = "SMARTGRPO_BACKEND"

_BACKENDS = ("auto", "reference", "cpp", "triton", "cuda")

# Stream limits of the Philox keying (see smartgrpo_fast.ops.philox).
MAX_ROWS = 2**32
MAX_CANDIDATES = 2**32
MAX_ELEMENTS = 2**34
MAX_ROUND = 2**32
MAX_SEED = 2**64


def describe(x: object) -> str:
    """A short description of an argument for error messages."""
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}"
    if isinstance(x, bool):
        return f"bool {x}"
    if isinstance(x, numbers.Number):
        return f"{type(x).__name__} {x!r}"
    return f"object of type {type(x).__name__}"


def alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate an op output. Every op allocates through here, so tests can NaN-fill it."""
    return torch.empty(shape, dtype=dtype, device=device)


def check_float_tensor(
    name: str, x: object, *, dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES, min_dim: int = 0
) -> torch.Tensor:
    """Raise TypeError unless ``x`` is a tensor of one of ``dtypes`` with ``ndim >= min_dim``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {describe(x)}")
    if x.dtype not in dtypes:
        names = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({names}), got {describe(x)}")
    if x.dim() < min_dim:
        raise ValueError(f"{name}: expected at least {min_dim} dimension(s), got {describe(x)}")
    return x


def check_same_device(device: torch.device, **tensors: object) -> None:
    """Raise ValueError if any tensor argument is not on ``device`` (``cuda`` without an
    index means the current CUDA device)."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and not same_device(t.device, device):
            raise ValueError(
                f"{name}: expected a tensor on {device} (the device of the op's main input), "
                f"got {describe(t)}"
            )


def check_no_grad(op: str, **tensors: object) -> None:
    """Raise ValueError if grad mode is on and a tensor requires grad (op not differentiable)."""
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise ValueError(
                f"{name}: {describe(t)} requires grad, but {op} is not differentiable; "
                f"call it under torch.no_grad() or pass {name}.detach()"
            )


def _check_number(name: str, x: object) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name}: expected a float or a tensor, got {describe(x)}")
    return float(x)


def check_finite_values(
    name: str, x: torch.Tensor | float, *, nonnegative: bool = False, validate: bool = True
) -> None:
    """Raise ValueError if ``x`` holds NaN/inf (or a negative value when ``nonnegative``).

    Python numbers are always checked. Tensors are checked when ``validate`` is true and no
    CUDA graph is being captured; the check reads the tensor, which synchronises a CUDA stream.
    """
    if isinstance(x, torch.Tensor):
        if not validate or is_capturing(x.device) or x.numel() == 0:
            return
        xf = x.detach()
        if not bool(torch.isfinite(xf).all()):
            bad = int((~torch.isfinite(xf)).sum())
            raise ValueError(f"{name}: expected finite values, got {bad} NaN/inf in {describe(x)}")
        if nonnegative and bool((xf < 0).any()):
            raise ValueError(
                f"{name}: expected values >= 0, got minimum {float(xf.min())} in {describe(x)}"
            )
        return
    if not math.isfinite(x):
        raise ValueError(f"{name}: expected a finite number, got {x!r}")
    if nonnegative and x < 0:
        raise ValueError(f"{name}: expected a value >= 0, got {x!r}")


class Mode(IntEnum):
    """How a parameter varies over rows and elements (a constexpr of every kernel)."""

    SCALAR = 0
    ROW = 1
    ELEM = 2


@dataclass(frozen=True)
class Param:
    """A normalised float parameter; see the module docstring."""

    mode: Mode
    value: float = 0.0
    tensor: torch.Tensor | None = None
    stride_b: int = 0
    stride_e: int = 0

    def rows(self, batch: int, numel: int) -> torch.Tensor:
        """The parameter as a float32 (batch, numel) tensor view (for the references)."""
        if self.tensor is None:
            raise RuntimeError("rows() needs a tensor parameter")
        t = self.tensor.float()
        if self.mode == Mode.ROW:
            return t.reshape(batch, 1).expand(batch, numel)
        return t.reshape(batch, numel)

    def values(self, batch: int, numel: int, device: torch.device) -> torch.Tensor:
        """float32 values for the references: 0-d for SCALAR, else (batch, numel).

        A SCALAR is filled on the device (``torch.full``: a fill kernel with the value as its
        argument), never copied from host memory (``torch.tensor(value, device=cuda)`` copies
        from pageable memory, which synchronises the stream and breaks CUDA-graph capture)."""
        if self.mode == Mode.SCALAR:
            return torch.full((), self.value, dtype=torch.float32, device=device)
        return self.rows(batch, numel)


def rows_view(name: str, x: torch.Tensor, batch: int, numel: int) -> tuple[torch.Tensor, int, int]:
    """View ``x`` of shape (batch, *S) as (batch, numel) and return it with its two strides.

    A view is returned whenever strides allow it (expanded and row-sliced tensors included);
    otherwise ``reshape`` copies.
    """
    x2 = x.reshape(batch, numel)
    return x2, x2.stride(0), x2.stride(1)


def normalize_param(
    name: str,
    x: object,
    *,
    batch: int,
    inner: tuple[int, ...],
    device: torch.device,
    allow_elem: bool = True,
    nonnegative: bool = False,
    validate: bool = True,
) -> Param:
    """Normalise a float-or-tensor parameter against rows ``batch`` and trailing shape ``inner``.

    Accepted: a Python number (SCALAR); a 0-d tensor (ROW, stride 0); a (batch,) tensor (ROW,
    one value per row even when it could also broadcast along the last axis); with
    ``allow_elem``, any tensor that broadcasts to (batch, *inner) (ELEM).
    """
    numel = math.prod(inner)
    if not isinstance(x, torch.Tensor):
        v = _check_number(name, x)
        check_finite_values(name, v, nonnegative=nonnegative)
        return Param(Mode.SCALAR, value=v)
    check_float_tensor(name, x, dtypes=(*FLOAT_DTYPES, torch.float64))
    check_same_device(device, **{name: x})
    check_finite_values(name, x, nonnegative=nonnegative, validate=validate)
    if x.dim() == 0:
        return Param(Mode.ROW, tensor=x.reshape(1).expand(batch), stride_b=0)
    if x.dim() == 1 and x.shape[0] == batch:
        return Param(Mode.ROW, tensor=x, stride_b=x.stride(0))
    full = (batch, *inner)
    if not allow_elem:
        raise ValueError(
            f"{name}: expected a number, a 0-d tensor or shape ({batch},), got {describe(x)}"
        )
    try:
        xe = x.expand(full)
    except RuntimeError:
        raise ValueError(
            f"{name}: expected a number, a ({batch},) tensor or a tensor broadcastable to "
            f"{full}, got {describe(x)}"
        ) from None
    x2, sb, se = rows_view(name, xe, batch, numel)
    if x2.dtype == torch.float64:
        x2 = x2.float()
        sb, se = x2.stride(0), x2.stride(1)
    return Param(Mode.ELEM, tensor=x2, stride_b=sb, stride_e=se)


def check_shape(shape: object, *, layout: str, min_dims: int) -> tuple[int, ...]:
    """Validate a ``shape`` argument: a sequence of at least ``min_dims`` ints, each >= 1.

    ``layout`` names the expected layout in messages, e.g. ``"(B, k, *S)"``.
    """
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, (tuple, list)) or not all(
        isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in shape
    ):
        raise TypeError(f"shape: expected a tuple of ints {layout}, got {describe(shape)}")
    shape = tuple(int(s) for s in shape)
    if len(shape) < min_dims:
        raise ValueError(
            f"shape: expected {layout} with at least {min_dims} dimension(s), got {shape}"
        )
    if any(s < 1 for s in shape):
        raise ValueError(f"shape: expected {layout} with every dimension >= 1, got {shape}")
    return shape


def _check_int(name: str, x: object, lo: int, hi: int) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name}: expected an int or a 0-d int64 tensor, got {describe(x)}")
    v = int(x)
    if not lo <= v < hi:
        raise ValueError(f"{name}: expected {lo} <= {name} < {hi}, got {v}")
    return v


def _check_int_tensor(name: str, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    if x.dtype != torch.int64 or x.dim() != 0:
        raise TypeError(f"{name}: expected an int or a 0-d int64 tensor, got {describe(x)}")
    check_same_device(device, **{name: x})
    return x


def check_seed(seed: object, device: torch.device) -> int | torch.Tensor:
    """Validate a seed: an int in [0, 2**64) or a 0-d int64 tensor on ``device``.

    A tensor seed holds the seed's 64 bits in two's complement (seeds >= 2**63 read negative).
    """
    if isinstance(seed, torch.Tensor):
        return _check_int_tensor("seed", seed, device)
    return _check_int("seed", seed, 0, MAX_SEED)


def check_round(rnd: object, device: torch.device, *, validate: bool = True) -> int | torch.Tensor:
    """Validate a round counter: an int in [0, 2**32) or a 0-d int64 tensor on ``device``."""
    if isinstance(rnd, torch.Tensor):
        _check_int_tensor("round", rnd, device)
        if validate and not is_capturing(rnd.device):
            v = int(rnd)
            if not 0 <= v < MAX_ROUND:
                raise ValueError(f"round: expected 0 <= round < {MAX_ROUND}, got tensor value {v}")
        return rnd
    return _check_int("round", rnd, 0, MAX_ROUND)


def _check_row_offset_value(v: int, batch: int, what: str) -> None:
    if v < 0 or v + batch > MAX_ROWS:
        raise ValueError(
            f"row_offset: expected 0 <= row_offset and row_offset + B <= 2**32 (B = {batch} "
            f"rows; the stream's row word is 32 bits), got {what}{v}"
        )


def check_row_offset(
    row_offset: object, batch: int, device: torch.device, *, validate: bool = True
) -> int | torch.Tensor:
    """Validate a row offset: an int or a 0-d int64 tensor on ``device``, with
    ``0 <= row_offset`` and ``row_offset + batch <= 2**32`` (row ``b`` of the call draws the
    stream's row ``b + row_offset``, a 32-bit word). A tensor's value is checked only when
    ``validate`` is true and no CUDA graph is being captured (it reads the tensor)."""
    if isinstance(row_offset, torch.Tensor):
        _check_int_tensor("row_offset", row_offset, device)
        if validate and not is_capturing(row_offset.device):
            _check_row_offset_value(int(row_offset), batch, "tensor value ")
        return row_offset
    if isinstance(row_offset, bool) or not isinstance(row_offset, numbers.Integral):
        raise TypeError(
            f"row_offset: expected an int or a 0-d int64 tensor, got {describe(row_offset)}"
        )
    v = int(row_offset)
    _check_row_offset_value(v, batch, "")
    return v


def check_stream_limits(batch: int, k: int, numel: int) -> None:
    """Raise ValueError when (batch, k, numel) exceeds what the Philox keying can address."""
    if batch >= MAX_ROWS:
        raise ValueError(f"rows: the noise stream addresses fewer than 2**32 rows, got {batch}")
    if k >= MAX_CANDIDATES:
        raise ValueError(f"k: the noise stream addresses fewer than 2**32 candidates, got {k}")
    if numel > MAX_ELEMENTS:
        raise ValueError(
            f"shape: the noise stream addresses at most 2**34 elements per (row, candidate), "
            f"got {numel}"
        )


def seed_words(seed: int | torch.Tensor) -> tuple[int, int]:
    """(low, high) 32-bit words of an int seed (the Philox key)."""
    s = int(seed) % MAX_SEED
    return s & 0xFFFFFFFF, s >> 32


def resolve_backend(device: torch.device) -> str:
    """The backend an op runs on ``device``: ``reference``, ``cpp``, ``triton`` or ``cuda``.

    ``SMARTGRPO_BACKEND`` selects it:

    * ``auto`` (default): Triton on CUDA tensors; on CPU tensors the compiled C++ ops once they
      are built (the first call builds them; if that fails, the PyTorch reference, with the
      reason logged once); the reference on any other device.
    * ``reference``: the PyTorch reference everywhere.
    * ``cpp``: the C++ ops, CPU tensors only.
    * ``triton``: the Triton kernels (on CPU tensors only under ``TRITON_INTERPRET=1``).
    * ``cuda``: the CUDA C++ ops, CUDA tensors only (on a torch built with CUDA).

    A value that is unknown, or cannot run here, raises a ValueError that names
    ``SMARTGRPO_BACKEND``, the value and the reason. Ops without a version for a backend fall
    back: see :func:`op_backend`.
    """
    name = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if name not in _BACKENDS:
        raise ValueError(f"{BACKEND_ENV}: expected one of {', '.join(_BACKENDS)}, got {name!r}")
    from smartgrpo_fast.ops import _cpp
    from smartgrpo_fast.ops._triton import HAS_TRITON, interpreting

    if name == "auto":
        if device.type == "cuda":
            return "triton" if HAS_TRITON else "reference"
        if device.type == "cpu" and _cpp.cpu_extension().ok:
            return "cpp"
        return "reference"
    if name == "triton":
        if not HAS_TRITON:
            raise ValueError(
                f"{BACKEND_ENV}=triton: triton is not installed (torch's CUDA wheels bring it; "
                "on a CPU, for TRITON_INTERPRET=1: pip install 'smartgrpo-fast[triton]')"
            )
        if device.type != "cuda" and not interpreting():
            raise ValueError(
                f"{BACKEND_ENV}=triton: tensors on {device} need TRITON_INTERPRET=1 set before "
                f"triton is first imported (Triton compiles for CUDA devices only)"
            )
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"{BACKEND_ENV}=triton: unsupported device {device}")
    elif name == "cpp":
        if device.type != "cpu":
            raise ValueError(
                f"{BACKEND_ENV}=cpp: the C++ ops run on CPU tensors, got tensors on {device}"
            )
        ext = _cpp.cpu_extension()
        if not ext.ok:
            raise ValueError(f"{BACKEND_ENV}=cpp: the C++ extension failed to build: {ext.reason}")
    elif name == "cuda":
        if torch.version.cuda is None:
            raise ValueError(
                f"{BACKEND_ENV}=cuda: torch has no CUDA (torch {torch.__version__} is a CPU build)"
            )
        if device.type != "cuda":
            raise ValueError(
                f"{BACKEND_ENV}=cuda: the CUDA C++ ops run on CUDA tensors, got tensors on {device}"
            )
        ext = _cpp.cuda_extension()
        if not ext.ok:
            raise ValueError(
                f"{BACKEND_ENV}=cuda: the CUDA C++ extension failed to build: {ext.reason}"
            )
    return name


def op_backend(device: torch.device, implemented: tuple[str, ...]) -> str:
    """:func:`resolve_backend`, mapped onto the backends an op ``implemented``.

    An op without a C++ version runs its reference under ``cpp`` (CPU tensors); one without a
    CUDA C++ version runs its Triton kernel under ``cuda`` (the reference without triton).
    """
    backend = resolve_backend(device)
    if backend in implemented:
        return backend
    if backend == "cuda":
        from smartgrpo_fast.ops._triton import HAS_TRITON

        return "triton" if HAS_TRITON and "triton" in implemented else "reference"
    return "reference"
