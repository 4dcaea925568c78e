"""x0_estimate against (z - t v) / scaling + shift, forward and backward."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from smartgrpo_fast.ops import x0_estimate

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _expected(z, v, t, scaling, shift):
    if isinstance(t, torch.Tensor) and t.dim() == 1:
        t = t.view(-1, *([1] * (z.dim() - 1)))
    out_dtype = torch.promote_types(z.dtype, v.dtype)
    return ((z.double() - t * v.double()) / scaling + shift).to(out_dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 4), (15, 5, 7, 9), (8, 16, 8, 8), (1, 1), (3, 4099)])
@pytest.mark.parametrize("t_form", ["float", "0d", "rows"])
def test_matches_definition(backend, run_reference, shape, dtype, t_form) -> None:
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(shape, generator=gen).to(dtype)
    v = torch.randn(shape, generator=gen).to(dtype)
    t = {
        "float": 0.625,
        "0d": torch.tensor(0.3),
        "rows": torch.rand(shape[0], generator=gen),
    }[t_form]
    x0 = x0_estimate(z, v, t, scaling=1.5305, shift=0.0609)
    assert x0.shape == z.shape and x0.dtype == dtype
    assert_close(x0, _expected(z, v, t, 1.5305, 0.0609), name="x0")
    ref = run_reference(x0_estimate, z, v, t, scaling=1.5305, shift=0.0609)
    assert_close(x0, ref, name="x0 vs reference")


def test_mixed_dtypes_promote(backend) -> None:
    z = torch.randn(4, 3, 5).bfloat16()
    v = torch.randn(4, 3, 5)
    x0 = x0_estimate(z, v, 0.5)
    assert x0.dtype == torch.float32
    assert_close(x0, _expected(z, v, 0.5, 1.0, 0.0), name="x0")


def test_non_contiguous_and_broadcast(backend) -> None:
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(6, 8, 10, generator=gen).transpose(1, 2)
    v = torch.randn(12, 10, 8, generator=gen)[::2]
    t = torch.rand(12, generator=gen)[::2]
    assert_close(x0_estimate(z, v, t), _expected(z, v, t, 1.0, 0.0), name="strided")
    vb = torch.randn(1, 10, 8, generator=gen).expand(6, 10, 8)
    assert_close(x0_estimate(z, vb, 0.2), _expected(z, vb, 0.2, 1.0, 0.0), name="expanded v")


def test_nan_velocity_propagates(backend) -> None:
    z = torch.randn(2, 5)
    v = torch.randn(2, 5)
    v[1, 3] = float("nan")
    x0 = x0_estimate(z, v, 0.5)
    assert torch.isnan(x0[1, 3]) and int(torch.isnan(x0).sum()) == 1


@pytest.mark.parametrize("t_form", ["float", "0d", "rows"])
def test_backward_matches_autograd_of_reference(backend, run_reference, t_form) -> None:
    gen = torch.Generator().manual_seed(3)
    z0 = torch.randn(4, 3, 6, generator=gen)
    v0 = torch.randn(4, 3, 6, generator=gen)
    t0 = {"float": 0.4, "0d": torch.tensor(0.4), "rows": torch.rand(4, generator=gen)}[t_form]
    g = torch.randn(4, 3, 6, generator=gen)

    def grads(fn):
        z, v = z0.clone().requires_grad_(), v0.clone().requires_grad_()
        t = t0.clone().requires_grad_() if isinstance(t0, torch.Tensor) else t0
        (fn(x0_estimate, z, v, t, scaling=2.0, shift=0.1) * g).sum().backward()
        return z.grad, v.grad, (t.grad if isinstance(t, torch.Tensor) else None)

    got = grads(lambda f, *a, **k: f(*a, **k))
    ref = grads(run_reference)
    for name, a, b in zip(("z", "v", "t"), got, ref, strict=True):
        if b is None:
            assert a is None
        else:
            assert a.shape == b.shape
            assert_close(a, b, atol=1e-5, rtol=1e-5, name=f"grad {name}")
