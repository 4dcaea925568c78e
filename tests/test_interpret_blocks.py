"""The Triton kernels with several blocks per row, on the interpreter.

Under ``TRITON_INTERPRET=1`` a program handles up to 65536 elements, so the other op tests run
every row as one block. Here ``SMARTGRPO_INTERPRET_BLOCK=1024`` cuts rows of
``D = 3 * 1024 + 17`` elements into four blocks, the last one partial, as on a GPU: block
offsets, Philox counters that continue across blocks, masks of the last block and the pooled
cross-block reduction of ``cem_update`` all run. Each op is compared with its reference
(tolerance per dtype, as in the other op tests) and with itself run as one block per row,
bit for bit wherever the blocks do not change the arithmetic.
"""

from __future__ import annotations

import pytest
import torch
from conftest import use_backend
from helpers import assert_close

from smartgrpo_fast.ops import cem_update, philox_normal, sample_perturb, x0_estimate
from smartgrpo_fast.ops._triton import INTERPRET_BLOCK_ENV, block_size, interpreting

CAP = 1024
D = 3 * CAP + 17  # four blocks per row, the last with 17 elements
#: Max |normal(kernel) - normal(reference)|: float32 rounding of log/sqrt/cos/sin.
NORMAL_ATOL = 1e-5


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Triton backend on the interpreter, with at most CAP elements per program."""
    use_backend(monkeypatch, "triton")
    monkeypatch.setenv(INTERPRET_BLOCK_ENV, str(CAP))
    assert block_size(D, 2048) == CAP


def one_block(monkeypatch: pytest.MonkeyPatch, fn, *args, **kwargs):
    """``fn`` on the Triton interpreter with its default cap: one block per row."""
    with monkeypatch.context() as m:
        m.delenv(INTERPRET_BLOCK_ENV)
        assert block_size(D, 1024) >= D
        return fn(*args, **kwargs)


def test_the_cap_is_read_at_call_time_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    if not interpreting():
        pytest.skip("the cap applies to the Triton interpreter only")
    monkeypatch.delenv(INTERPRET_BLOCK_ENV, raising=False)
    assert block_size(D, 1024) == 4096
    monkeypatch.setenv(INTERPRET_BLOCK_ENV, "256")
    assert block_size(D, 1024) == 256 and block_size(20, 1024) == 32
    for bad in ("1000", "8", "big"):
        monkeypatch.setenv(INTERPRET_BLOCK_ENV, bad)
        with pytest.raises(ValueError, match=rf"^{INTERPRET_BLOCK_ENV}: .*got '{bad}'"):
            block_size(D, 1024)


def test_philox_normal(small_blocks, monkeypatch, run_reference) -> None:
    kw = dict(seed=2**40 + 9, round=3)
    whole = philox_normal((4, 2, D), **kw)
    part = philox_normal((2, 2, D), row_offset=torch.tensor(2), **kw)
    assert torch.equal(part, whole[2:])  # rows of a larger call, bit for bit
    assert torch.equal(part, one_block(monkeypatch, philox_normal, (2, 2, D), row_offset=2, **kw))
    ref = run_reference(philox_normal, (2, 2, D), row_offset=2, **kw)
    assert_close(part, ref, atol=NORMAL_ATOL, rtol=0, name="n")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [D, 4 * CAP])  # 16 divides 4 * CAP: the kernel's 2-D tile store
def test_sample_perturb_non_contiguous(small_blocks, monkeypatch, run_reference, dtype, d) -> None:
    gen = torch.Generator().manual_seed(1)
    mean = torch.randn(d, 2, generator=gen).to(dtype).t()  # (2, d), element stride 2
    mu = 0.1 * torch.randn(2, 2 * d, generator=gen)[:, 1::2]  # per element, strided
    sigma = torch.rand(4, generator=gen)[::2] + 0.5  # per row, strided
    args = (mean, mu, sigma, torch.tensor([0.7, 1.3]))
    kw = dict(k=3, seed=5, round=2, row_offset=torch.tensor(1))
    z = sample_perturb(*args, **kw)
    assert torch.equal(z, one_block(monkeypatch, sample_perturb, *args, **kw))
    assert_close(z, run_reference(sample_perturb, *args, **kw), name="z")


@pytest.mark.parametrize("per_element", [True, False])
@pytest.mark.parametrize("counts", [None, [0, 1, 3]])
@pytest.mark.parametrize("k,t", [(6, 3), (18, 9)])  # 9: two full steps of 4 elites, then 1
def test_cem_update_non_contiguous(
    small_blocks, monkeypatch, run_reference, per_element, counts, k, t
) -> None:
    gen = torch.Generator().manual_seed(2)
    b = 3
    mu = (0.2 * torch.randn(D, b, generator=gen)).t()  # (B, D), non-contiguous
    if per_element:
        sigma = (torch.rand(D, b, generator=gen) + 0.5).t()
    else:
        sigma = torch.rand(b, generator=gen) + 0.5
    idx = torch.stack([torch.randperm(k, generator=gen)[: 2 * t] for _ in range(b)])
    idx = idx.int()[:, ::2]  # int32, strided
    kw = dict(shape=(b, D), k=k, seed=7, round=4, alpha=0.7, min_sigma=0.05,
              per_element=per_element, row_offset=5,
              counts=None if counts is None else torch.tensor(counts))  # fmt: skip
    got = cem_update(mu, sigma, idx, **kw)
    whole = one_block(monkeypatch, cem_update, mu, sigma, idx, **kw)
    ref = run_reference(cem_update, mu, sigma, idx.long(), **kw)
    assert torch.equal(got[0], whole[0])  # per element: blocks do not change the arithmetic
    if per_element:
        assert torch.equal(got[1], whole[1])
    else:  # pooled: four partial sums per row instead of one
        assert_close(got[1], whole[1], atol=1e-6, rtol=1e-6, name="sigma_new vs one block")
    assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5, name="mu_new")
    assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5, name="sigma_new")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_x0_estimate_non_contiguous(small_blocks, monkeypatch, run_reference, dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(D, 3, generator=gen).to(dtype).t()  # (3, D), element stride 3
    v = torch.randn(3, 2 * D, generator=gen).to(dtype)[:, ::2]  # element stride 2
    t = torch.tensor([0.2, 0.5, 0.9])
    kw = dict(scaling=1.5305, shift=0.0609)
    x0 = x0_estimate(z, v, t, **kw)
    assert torch.equal(x0, one_block(monkeypatch, x0_estimate, z, v, t, **kw))
    assert_close(x0, run_reference(x0_estimate, z, v, t, **kw), name="x0")
