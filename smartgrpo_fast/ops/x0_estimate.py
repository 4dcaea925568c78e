"""x0_estimate: the one-step clean estimate in the decoder's scale, in one pass.

``x0 = (z - t * v) / scaling + shift``: the flow-matching estimate ``z - t v`` fused with the
VAE un-scaling that diffusers applies before decoding (SD3: ``latents / scaling_factor +
shift_factor``). Differentiable in z, v and a tensor t on every backend (the backward of the
custom operator ``smartgrpo_fast::x0_estimate`` is elementwise PyTorch). The forward also
exists in C++ for CPU tensors (backend ``cpp``); under ``cuda`` the Triton kernel runs (no
CUDA C++ version).
"""

from __future__ import annotations

import math

import torch

from smartgrpo_fast.ops import _cpp
from smartgrpo_fast.ops._common import (
    Param,
    alloc,
    check_finite_values,
    check_float_tensor,
    describe,
    normalize_param,
    op_backend,
    rows_view,
)
from smartgrpo_fast.ops._fast import MISSING, PlanCache, backend_env, direct, form
from smartgrpo_fast.ops._library import (
    LIB,
    compiling,
    define_op,
    kernel,
    param_arg,
    param_of,
    trace_triton,
)
from smartgrpo_fast.ops._triton import block_size, tl, triton

__all__ = ["x0_estimate", "x0_estimate_reference"]

_BACKENDS = ("reference", "triton", "cpp")

if triton is not None:

    @triton.jit
    def _x0_estimate_kernel(
        x0_ptr,
        z_ptr,
        v_ptr,
        t_ptr,
        t_val,
        scaling,
        shift,
        D,
        n_blocks,
        stride_z_b,
        stride_z_e,
        stride_v_b,
        stride_v_e,
        stride_t_b,
        T_MODE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        i_blk = pid % n_blocks
        i_row = pid // n_blocks
        offs = i_blk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < D
        b_z = tl.load(z_ptr + i_row * stride_z_b + offs * stride_z_e, mask=mask, other=0.0)
        b_v = tl.load(v_ptr + i_row * stride_v_b + offs * stride_v_e, mask=mask, other=0.0)
        if T_MODE == 0:
            t = tl.cast(t_val, tl.float32)
        else:
            t = tl.load(t_ptr + i_row * stride_t_b).to(tl.float32)
        b_x0 = (b_z.to(tl.float32) - t * b_v.to(tl.float32)) / tl.cast(scaling, tl.float32)
        b_x0 = b_x0 + tl.cast(shift, tl.float32)
        tl.store(x0_ptr + i_row * D + offs, b_x0.to(x0_ptr.dtype.element_ty), mask=mask)


def x0_estimate_reference(
    z2: torch.Tensor, v2: torch.Tensor, t: Param, scaling: float, shift: float
) -> torch.Tensor:
    """Plain PyTorch x0 on (N, D) views; float32 (N, D). Differentiable."""
    tt = t.values(z2.shape[0], 1, z2.device)
    return (z2.float() - tt * v2.float()) / scaling + shift


def _launch_triton(
    z2: torch.Tensor,
    v2: torch.Tensor,
    t: Param,
    scaling: float,
    shift: float,
    out: torch.Tensor,
    wrap: bool = False,
) -> None:
    rows, numel = z2.shape
    block = block_size(numel, 2048)
    n_blocks = triton.cdiv(numel, block)
    kernel(_x0_estimate_kernel, wrap)[(n_blocks * rows,)](
        out,
        z2,
        v2,
        t.tensor if t.tensor is not None else z2,
        t_val=t.value,
        scaling=scaling,
        shift=shift,
        D=numel,
        n_blocks=n_blocks,
        stride_z_b=z2.stride(0),
        stride_z_e=z2.stride(1),
        stride_v_b=v2.stride(0),
        stride_v_e=v2.stride(1),
        stride_t_b=t.stride_b,
        T_MODE=int(t.mode),
        BLOCK=block,
        num_warps=4,
    )


def _x0_estimate(
    backend: str,
    z: torch.Tensor,
    v: torch.Tensor,
    t: Param,
    scaling: float,
    shift: float,
    wrap: bool = False,
) -> torch.Tensor:
    """(N, *S) x0 of ``z``, ``v`` (N, *S) in their promoted dtype on ``backend`` (arguments
    validated by the caller; ``wrap``: launch the Triton kernel through wrap_triton)."""
    rows, inner = z.shape[0], tuple(z.shape[1:])
    numel = math.prod(inner)
    z2, _, _ = rows_view("z", z, rows, numel)
    v2, _, _ = rows_view("v", v, rows, numel)
    out = alloc(tuple(z.shape), torch.promote_types(z.dtype, v.dtype), z.device)
    if backend == "reference" or rows * numel == 0:
        # copied into the contiguous output, whatever layout the strided math produced
        out.copy_(x0_estimate_reference(z2, v2, t, scaling, shift).reshape(z.shape))
        return out
    if backend == "cpp":
        _cpp.x0_estimate_out(out, z2, v2, t, scaling, shift)
    else:
        _launch_triton(z2, v2, t, scaling, shift, out, wrap)
    return out


def _x0_estimate_op(
    z: torch.Tensor,
    v: torch.Tensor,
    t: torch.Tensor | None,
    t_val: float,
    scaling: float,
    shift: float,
) -> torch.Tensor:
    """``smartgrpo_fast::x0_estimate``: (N, *S) ``(z - t v) / scaling + shift`` in the promoted
    dtype of z and v, with ``t`` an (N,) tensor or None and ``t_val``, on the backend picked now
    (arguments validated by the caller). Differentiable in z, v and t."""
    backend = op_backend(z.device, _BACKENDS)
    return _x0_estimate(backend, z, v, param_of(t, t_val), scaling, shift)


def _x0_estimate_fake(z, v, t, t_val, scaling, shift):
    return z.new_empty(z.shape, dtype=torch.promote_types(z.dtype, v.dtype))


define_op(
    (
        "x0_estimate(Tensor z, Tensor v, Tensor? t, float t_val, float scaling, float shift) "
        "-> Tensor"
    ),
    _x0_estimate_op,
    _x0_estimate_fake,
)


def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    z, v, t, t_val, scaling, _shift = inputs
    ctx.save_for_backward(v, t)
    ctx.t_val, ctx.scaling = t_val, scaling
    ctx.dtypes = (z.dtype, v.dtype)


def _backward(ctx, g):  # type: ignore[no-untyped-def]
    """Elementwise: dz = g/s, dv = -t g/s, dt = -sum(v g)/s per row (float32 math)."""
    v, t = ctx.saved_tensors
    rows = g.shape[0]
    numel = math.prod(g.shape[1:])
    gf = g.reshape(rows, numel).float() / ctx.scaling
    tt = param_of(t, ctx.t_val).values(rows, 1, g.device)
    grad_z = gf.to(ctx.dtypes[0]).reshape(g.shape) if ctx.needs_input_grad[0] else None
    grad_v = (-tt * gf).to(ctx.dtypes[1]).reshape(g.shape) if ctx.needs_input_grad[1] else None
    grad_t = None
    if t is not None and ctx.needs_input_grad[2]:
        grad_t = (-(v.reshape(rows, numel).float() * gf).sum(dim=1)).to(t.dtype)
    return grad_z, grad_v, grad_t, None, None, None


torch.library.register_autograd(
    "smartgrpo_fast::x0_estimate", _backward, setup_context=_setup_context, lib=LIB
)

if triton is not None:

    @torch.library.triton_op("smartgrpo_fast::x0_estimate_triton", mutates_args=())
    def _x0_estimate_triton_op(
        z: torch.Tensor,
        v: torch.Tensor,
        t: torch.Tensor | None,
        t_val: float,
        scaling: float,
        shift: float,
    ) -> torch.Tensor:
        """``smartgrpo_fast::x0_estimate_triton``: the Triton kernel (what torch.compile traces
        under the ``triton`` backend); differentiable like ``x0_estimate``."""
        return _x0_estimate("triton", z, v, param_of(t, t_val), scaling, shift, wrap=True)

    _x0_estimate_triton_op.register_autograd(_backward, setup_context=_setup_context)


def x0_estimate(
    z: torch.Tensor,
    v: torch.Tensor,
    t: float | torch.Tensor,
    *,
    scaling: float = 1.0,
    shift: float = 0.0,
    validate: bool = True,
) -> torch.Tensor:
    """One-step clean estimate in the decoder's scale: ``x0 = (z - t*v) / scaling + shift``.

    Args:
        z: (N, *S) float32/bfloat16/float16 latents (e.g. N = B*K candidates). Any strides.
        v: (N, *S) velocities, same shape and device as z (dtype may differ).
        t: flow time: a float, a 0-d tensor, or an (N,) tensor (one time per row).
        scaling: the VAE's scaling factor (non-zero, finite).
        shift: the VAE's shift factor (finite).
        validate: check a tensor t's values are finite (reads it; synchronises a CUDA stream;
            skipped during graph capture).

    Returns:
        x0: (N, *S) in the promoted dtype of z and v, computed in float32. Differentiable in
        z, v and a tensor t.

    Calls ``torch.ops.smartgrpo_fast.x0_estimate`` (under ``torch.compile``, which skips the
    argument checks, ``x0_estimate_triton`` when the backend is ``triton``); an eager call with
    ``validate=False`` and no gradient to record runs a cached plan instead (see
    :mod:`smartgrpo_fast.ops._fast`).
    """
    if not validate and not compiling():
        try:  # a malformed argument (no tensor, unhashable) takes the checks below
            key = (
                backend_env(), torch.is_grad_enabled(),
                z.shape, z.stride(), z.dtype, z.device, z.requires_grad,
                v.shape, v.stride(), v.dtype, v.device, v.requires_grad,
                form(t),
            )  # fmt: skip
            plan = _PLANS.lookup(key)
        except (AttributeError, TypeError):
            plan = None
        if plan is MISSING:
            plan = _plan(z, v, t, scaling, shift)
            _PLANS.put(key, plan)
        if plan is not None:
            out = plan(z, v, t, scaling, shift)
            if out is not None:
                return out
    if not compiling():
        _validate(z, v, t, scaling, shift, validate)
    op = torch.ops.smartgrpo_fast.x0_estimate
    if compiling() and trace_triton(z.device, _BACKENDS):
        op = torch.ops.smartgrpo_fast.x0_estimate_triton
    return op(z, v, *param_arg(t, z.shape[0], (1,)), float(scaling), float(shift))


def _validate(
    z: object, v: object, t: object, scaling: object, shift: object, validate: bool
) -> None:
    """Check x0_estimate's arguments (see its docstring)."""
    check_float_tensor("z", z, min_dim=1)
    check_float_tensor("v", v, min_dim=1)
    if v.device != z.device:
        raise ValueError(f"v: expected a tensor on {z.device} (z's device), got {describe(v)}")
    if v.shape != z.shape:
        raise ValueError(f"v: expected shape {tuple(z.shape)} (z's shape), got {describe(v)}")
    for name, val in (("scaling", scaling), ("shift", shift)):
        if isinstance(val, bool) or not isinstance(val, (int, float)):
            raise TypeError(f"{name}: expected a float, got {describe(val)}")
        check_finite_values(name, float(val))
    if scaling == 0:
        raise ValueError("scaling: expected a non-zero number, got 0")
    rows, inner = z.shape[0], tuple(z.shape[1:])
    normalize_param(
        "t", t, batch=rows, inner=inner, device=z.device, allow_elem=False, validate=validate
    )


_PLANS = PlanCache()
_NUMBER = (int, float)


def _plan(z, v, t, scaling, shift):
    """The fast path's plan for the forms of these arguments (validated here: a bad one
    raises), or None for a call that records a gradient (autograd needs the operator) or has
    no element. The plan returns x0, or None when a float ``t``, ``scaling`` or ``shift`` is not
    a finite number (``scaling`` non-zero): then the slow path raises the usual error."""
    _validate(z, v, t, scaling, shift, False)
    if torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in (z, v, t)
    ):
        return None
    rows, inner = z.shape[0], tuple(z.shape[1:])
    numel = math.prod(inner)
    if rows * numel == 0:
        return None
    backend = op_backend(z.device, _BACKENDS)
    out_shape, device = tuple(z.shape), z.device
    dtype = torch.promote_types(z.dtype, v.dtype)
    t_num = not isinstance(t, torch.Tensor)
    isfinite = math.isfinite

    def bad(t, scaling, shift) -> bool:
        return (
            (t_num and not isfinite(t))
            or scaling.__class__ not in _NUMBER
            or shift.__class__ not in _NUMBER
            or not (isfinite(scaling) and isfinite(shift) and scaling != 0)
        )

    if backend != "cpp":

        def generic(z, v, t, scaling, shift):
            if bad(t, scaling, shift):
                return None
            t_param = param_of(*param_arg(t, rows, (1,)))
            return _x0_estimate(backend, z, v, t_param, float(scaling), float(shift))

        return generic

    op = direct(torch.ops.smartgrpo_fast.x0_estimate_out.default)
    nd = z.dim() >= 2  # the C++ op views (N, *S) as (N, D) itself
    t_row = t_num or (t.dim() == 1 and t.shape[0] == rows)

    def cpp(z, v, t, scaling, shift):
        if bad(t, scaling, shift):
            return None
        out = alloc(out_shape, dtype, device)
        op(
            out,
            z if nd else z.reshape(rows, numel),
            v if nd else v.reshape(rows, numel),
            None if t_num else (t if t_row else param_arg(t, rows, (1,))[0]),
            float(t) if t_num else 0.0,
            scaling,
            shift,
        )
        return out

    return cpp
