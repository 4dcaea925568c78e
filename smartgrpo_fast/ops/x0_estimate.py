"""x0_estimate: the one-step clean estimate in the decoder's scale, in one pass.

``x0 = (z - t * v) / scaling + shift``: the flow-matching estimate ``z - t v`` fused with the
VAE un-scaling that diffusers applies before decoding (SD3: ``latents / scaling_factor +
shift_factor``). Differentiable in z, v and a tensor t. The forward also exists in C++ for
CPU tensors (backend ``cpp``); under ``cuda`` the Triton kernel runs (no CUDA C++ version).
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
from smartgrpo_fast.ops._triton import block_size, tl, triton

__all__ = ["x0_estimate", "x0_estimate_reference"]

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
) -> None:
    rows, numel = z2.shape
    block = block_size(numel, 2048)
    n_blocks = triton.cdiv(numel, block)
    _x0_estimate_kernel[(n_blocks * rows,)](
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


def _launch(
    backend: str,
    z2: torch.Tensor,
    v2: torch.Tensor,
    t: Param,
    scaling: float,
    shift: float,
    out: torch.Tensor,
) -> None:
    """Fill ``out`` (N, D) from the (N, D) views z2, v2 on ``backend`` (``triton`` or ``cpp``)."""
    if backend == "cpp":
        _cpp.x0_estimate_out(out, z2, v2, t, scaling, shift)
    else:
        _launch_triton(z2, v2, t, scaling, shift, out)


class _X0Estimate(torch.autograd.Function):
    """Triton or C++ forward; the backward is elementwise: dz = g/s, dv = -t g/s,
    dt = -sum(v g)/s."""

    @staticmethod
    def forward(ctx, z2, v2, t_tensor, t, scaling, shift, out_dtype, backend):  # type: ignore[override]
        out = alloc(tuple(z2.shape), out_dtype, z2.device)
        _launch(backend, z2, v2, t, scaling, shift, out)
        ctx.save_for_backward(v2, t_tensor)
        ctx.t, ctx.scaling = t, scaling
        ctx.dtypes = (z2.dtype, v2.dtype)
        return out

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        v2, t_tensor = ctx.saved_tensors
        t, scaling = ctx.t, ctx.scaling
        gf = g.float() / scaling
        tt = t.values(g.shape[0], 1, g.device)
        grad_z = gf.to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        grad_v = (-tt * gf).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        grad_t = None
        if ctx.needs_input_grad[2]:
            per_row = -(v2.float() * gf).sum(dim=1)
            grad_t = (per_row.sum() if t_tensor.dim() == 0 else per_row).to(t_tensor.dtype)
        return grad_z, grad_v, grad_t, None, None, None, None, None


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
        x0: (N, *S) in the promoted dtype of z and v, computed in float32.
    """
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
    numel = math.prod(inner)
    p_t = normalize_param(
        "t", t, batch=rows, inner=inner, device=z.device, allow_elem=False, validate=validate
    )
    z2, _, _ = rows_view("z", z, rows, numel)
    v2, _, _ = rows_view("v", v, rows, numel)
    out_dtype = torch.promote_types(z.dtype, v.dtype)

    backend = op_backend(z.device, ("reference", "triton", "cpp"))
    if backend == "reference" or rows * numel == 0:
        x0 = x0_estimate_reference(z2, v2, p_t, float(scaling), float(shift))
        return x0.to(out_dtype).reshape(z.shape)

    t_tensor = p_t.tensor if p_t.tensor is not None else torch.zeros((), device=z.device)
    needs_grad = torch.is_grad_enabled() and (
        z.requires_grad or v.requires_grad or t_tensor.requires_grad
    )
    if needs_grad:
        if p_t.tensor is not None and isinstance(t, torch.Tensor):
            t_tensor = t  # the user's tensor, so its grad has its shape
        out = _X0Estimate.apply(
            z2, v2, t_tensor, p_t, float(scaling), float(shift), out_dtype, backend
        )
    else:
        out = alloc((rows, numel), out_dtype, z.device)
        _launch(backend, z2, v2, p_t, float(scaling), float(shift), out)
    return out.reshape(z.shape)
