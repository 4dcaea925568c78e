"""Compiled Triton kernels and the CUDA C++ ops on a real GPU against the PyTorch references
(skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from smartgrpo_fast.ops import (
    cem_update,
    philox_normal,
    sample_perturb,
    topk_select,
    x0_estimate,
)
from smartgrpo_fast.ops.philox import philox_bits

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")


def _ref(fn, monkeypatch, *args, **kwargs):
    with monkeypatch.context() as m:
        m.setenv("SMARTGRPO_BACKEND", "reference")
        return fn(*args, **kwargs)


def test_bits_and_normals_match_reference(monkeypatch) -> None:
    counters = torch.randint(0, 2**32, (1 << 16, 4), dtype=torch.int64)
    ref = _ref(philox_bits, monkeypatch, counters, 123, 456)
    assert torch.equal(philox_bits(counters.to(CUDA), 123, 456).cpu(), ref)
    shape = (4, 16, 16, 32, 32)
    n = philox_normal(shape, seed=5, round=1, device=CUDA)
    n_ref = _ref(philox_normal, monkeypatch, shape, seed=5, round=1)
    diff = float((n.cpu() - n_ref).abs().max())
    print(f"max |n_cuda - n_reference| over {n.numel()} normals: {diff:.3g}")
    assert diff <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ops_match_reference(monkeypatch, dtype) -> None:
    b, k, t, s = 3, 16, 4, (16, 32, 32)
    mean = torch.randn(b, *s).to(dtype)
    mu = 0.1 * torch.randn(b, *s)
    sigma = torch.rand(b) + 0.5
    scale = torch.rand(b)
    z = sample_perturb(mean.to(CUDA), mu.to(CUDA), sigma.to(CUDA), scale.to(CUDA), k=k, seed=9)
    z_ref = _ref(sample_perturb, monkeypatch, mean, mu, sigma, scale, k=k, seed=9)
    assert_close(z.cpu(), z_ref, name="z")
    v = torch.randn_like(z_ref)
    x0 = x0_estimate(z, v.to(CUDA), 0.7, scaling=1.5305, shift=0.0609)
    x0_ref = _ref(x0_estimate, monkeypatch, z_ref, v, 0.7, scaling=1.5305, shift=0.0609)
    assert_close(x0.cpu(), x0_ref, name="x0")
    r = torch.randn(b, k)
    r[0, 3] = float("nan")
    idx = topk_select(r.to(CUDA), t)
    assert torch.equal(idx.cpu(), _ref(topk_select, monkeypatch, r, t))
    for per_element in (True, False):
        sig = sigma if not per_element else sigma.view(b, 1, 1, 1).expand(b, *s)
        kw = dict(shape=(b, *s), k=k, seed=9, round=0, alpha=0.8, per_element=per_element)
        got = cem_update(mu.to(CUDA), sig.to(CUDA), idx, **kw)
        ref = _ref(cem_update, monkeypatch, mu, sig, idx.cpu(), **kw)
        assert_close(got[0].cpu(), ref[0], atol=1e-5, rtol=1e-5, name="mu_new")
        assert_close(got[1].cpu(), ref[1], atol=1e-5, rtol=1e-5, name="sigma_new")


def _check_graph_replay_draws_fresh_noise() -> None:
    """Capture sample_perturb once with a device round counter; each replay after an in-place
    change of the counter must draw that round's noise."""
    mean = torch.zeros(2, 4, 8, 8, device=CUDA)
    seed = torch.tensor(3, device=CUDA)
    rnd = torch.tensor(0, device=CUDA)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        sample_perturb(mean, 0.0, 1.0, 1.0, k=3, seed=seed, round=rnd)  # warm-up compile
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        z = sample_perturb(mean, 0.0, 1.0, 1.0, k=3, seed=seed, round=rnd)
    outs = []
    for r in range(3):
        rnd.fill_(r)
        graph.replay()
        outs.append(z.clone())
    torch.cuda.synchronize()
    for r, out in enumerate(outs):
        assert torch.equal(out, philox_normal((2, 3, 4, 8, 8), seed=3, round=r, device=CUDA))
    assert not torch.equal(outs[0], outs[1])


def test_graph_replay_draws_fresh_noise_from_device_round() -> None:
    _check_graph_replay_draws_fresh_noise()


# --------------------------------------------------------------------------------------
# The CUDA C++ ops (SMARTGRPO_BACKEND=cuda): the same stream and semantics
# --------------------------------------------------------------------------------------


@pytest.fixture
def cuda_cpp(monkeypatch):
    """Force the CUDA C++ backend; skip with the reason when it cannot be built here."""
    from smartgrpo_fast.ops import _cpp

    ext = _cpp.cuda_extension()
    if not ext.ok:
        pytest.skip(f"the CUDA C++ extension could not be built: {ext.reason}")
    monkeypatch.setenv("SMARTGRPO_BACKEND", "cuda")


def test_cuda_cpp_bits_and_normals_match_reference(cuda_cpp, monkeypatch) -> None:
    counters = torch.randint(0, 2**32, (1 << 16, 4), dtype=torch.int64)
    ref = _ref(philox_bits, monkeypatch, counters, 123, 456)
    assert torch.equal(philox_bits(counters.to(CUDA), 123, 456).cpu(), ref)
    for shape in ((4, 16, 16, 32, 32), (2, 3, 4099), (1, 1, 3)):
        n = philox_normal(shape, seed=5, round=1, device=CUDA)
        n_ref = _ref(philox_normal, monkeypatch, shape, seed=5, round=1)
        diff = float((n.cpu() - n_ref).abs().max())
        print(f"max |n_cuda_cpp - n_reference| over {n.numel()} normals: {diff:.3g}")
        assert diff <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("s", [(16, 32, 32), (3, 343)])
def test_cuda_cpp_ops_match_reference(cuda_cpp, monkeypatch, dtype, s) -> None:
    b, k, t = 3, 16, 4
    mean = torch.randn(b, *s).to(dtype)
    mu = (0.1 * torch.randn(b, *s)).to(dtype)
    sigma = torch.rand(b, dtype=torch.float64) + 0.5
    scale = torch.rand(b)
    z = sample_perturb(mean.to(CUDA), mu.to(CUDA), sigma.to(CUDA), scale.to(CUDA), k=k, seed=9)
    z_ref = _ref(sample_perturb, monkeypatch, mean, mu, sigma, scale, k=k, seed=9)
    assert_close(z.cpu(), z_ref, name="z")
    idx = torch.stack([torch.randperm(k)[:t] for _ in range(b)])
    for per_element in (True, False):
        sig = sigma.float().reshape(b, *([1] * len(s))).expand(b, *s) if per_element else sigma
        kw = dict(shape=(b, *s), k=k, seed=9, round=0, alpha=0.8, min_sigma=0.1,
                  per_element=per_element)  # fmt: skip
        got = cem_update(mu.to(CUDA), sig.to(CUDA), idx.int().to(CUDA), **kw)
        ref = _ref(cem_update, monkeypatch, mu, sig, idx, **kw)
        assert_close(got[0].cpu(), ref[0], atol=1e-5, rtol=1e-5, name="mu_new")
        assert_close(got[1].cpu(), ref[1], atol=1e-5, rtol=1e-5, name="sigma_new")


def test_cuda_cpp_bad_elite_gives_nan_row(cuda_cpp) -> None:
    idx = torch.tensor([[0, 1], [0, 7]], device=CUDA)
    for per_element in (True, False):
        mu, sigma = cem_update(0.0, 1.0, idx, shape=(2, 3000), k=4, seed=0, round=0,
                               per_element=per_element, validate=False)  # fmt: skip
        assert torch.isfinite(mu[0]).all() and torch.isnan(mu[1]).all()
        assert torch.isfinite(sigma[0]).all() and torch.isnan(sigma[1]).all()


def test_cuda_cpp_graph_replay_draws_fresh_noise_from_device_round(cuda_cpp) -> None:
    _check_graph_replay_draws_fresh_noise()


@pytest.mark.parametrize("gpu_backend", ["triton", "cuda"])
def test_row_offset_gives_the_rows_of_the_larger_call(monkeypatch, gpu_backend) -> None:
    """row_offset on the GPU backends: rows [o, o + B) of a batch, bit for bit, and the same
    values as the reference (int and device-tensor offsets)."""
    if gpu_backend == "cuda":
        from smartgrpo_fast.ops import _cpp

        if not (ext := _cpp.cuda_extension()).ok:
            pytest.skip(f"the CUDA C++ extension could not be built: {ext.reason}")
    monkeypatch.setenv("SMARTGRPO_BACKEND", gpu_backend)
    b, k, t, s, o = 2, 6, 3, (3, 1111), 3
    mean = torch.randn(o + b, *s, device=CUDA)
    mu = 0.1 * torch.randn(o + b, *s, device=CUDA)
    idx = torch.stack([torch.randperm(k)[:t] for _ in range(o + b)]).to(CUDA)
    offset = torch.tensor(o, device=CUDA)
    for row_offset in (o, offset):
        n = philox_normal((b, k, *s), seed=4, round=2, device=CUDA, row_offset=row_offset)
        assert torch.equal(n, philox_normal((o + b, k, *s), seed=4, round=2, device=CUDA)[o:])
        z_big = sample_perturb(mean, mu, 0.8, 0.5, k=k, seed=4, round=2)
        z = sample_perturb(mean[o:], mu[o:], 0.8, 0.5, k=k, seed=4, round=2, row_offset=row_offset)
        assert torch.equal(z, z_big[o:])
        for per_element in (True, False):
            kw = dict(k=k, seed=4, round=2, alpha=0.7, per_element=per_element)
            big = cem_update(mu, 0.8, idx, shape=(o + b, *s), **kw)
            part = cem_update(mu[o:], 0.8, idx[o:], shape=(b, *s), row_offset=row_offset, **kw)
            ref = _ref(cem_update, monkeypatch, mu[o:].cpu(), 0.8, idx[o:].cpu(),
                       shape=(b, *s), row_offset=o, **kw)  # fmt: skip
            for got, whole, want in zip(part, big, ref, strict=True):
                assert torch.equal(got, whole[o:])
                assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gpu_backend", ["triton", "cuda"])
@pytest.mark.parametrize("per_element", [True, False])
def test_cem_update_counts_match_reference(monkeypatch, gpu_backend, per_element) -> None:
    """counts on the GPU backends (several blocks per row): rows of 0 elites unchanged."""
    if gpu_backend == "cuda":
        from smartgrpo_fast.ops import _cpp

        if not (ext := _cpp.cuda_extension()).ok:
            pytest.skip(f"the CUDA C++ extension could not be built: {ext.reason}")
    monkeypatch.setenv("SMARTGRPO_BACKEND", gpu_backend)
    b, k, t, s = 4, 8, 4, (4, 3001)
    mu = 0.1 * torch.randn(b, *s)
    sigma = torch.rand(b, *(s if per_element else ())) + 0.5
    idx = torch.stack([torch.randperm(k)[:t] for _ in range(b)])
    counts = torch.tensor([0, 1, 3, 4])
    kw = dict(shape=(b, *s), k=k, seed=6, round=1, alpha=0.7, min_sigma=0.2,
              per_element=per_element, row_offset=5)  # fmt: skip
    got = cem_update(mu.to(CUDA), sigma.to(CUDA), idx.to(CUDA), counts=counts.to(CUDA), **kw)
    ref = _ref(cem_update, monkeypatch, mu, sigma, idx, counts=counts, **kw)
    assert_close(got[0].cpu(), ref[0], atol=1e-5, rtol=1e-5, name="mu_new")
    assert_close(got[1].cpu(), ref[1], atol=1e-5, rtol=1e-5, name="sigma_new")
    assert torch.equal(got[0][0].cpu(), mu[0]) and torch.equal(got[1][0].cpu(), sigma[0])


# --------------------------------------------------------------------------------------
# CUDA-graph capture of every argument form, on both GPU backends
# --------------------------------------------------------------------------------------


def _use_gpu_backend(monkeypatch, name: str) -> None:
    if name == "cuda":
        from smartgrpo_fast.ops import _cpp

        if not (ext := _cpp.cuda_extension()).ok:
            pytest.skip(f"the CUDA C++ extension could not be built: {ext.reason}")
    monkeypatch.setenv("SMARTGRPO_BACKEND", name)


def _replayed(fn):
    """``fn()`` captured in a CUDA graph (after a warm-up call on the capture stream) and
    replayed once: the graph's outputs."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    torch.cuda.synchronize()
    _KEEP.append(graph)  # the outputs live in the graph's memory pool: keep the graph
    return out


_KEEP: list = []


def _forms(b: int, s: tuple[int, ...]) -> dict:
    """Every form of a float parameter: a float, 0-d, (B,), per element (and expanded)."""
    gen = torch.Generator().manual_seed(3)
    return {
        "float": 0.7,
        "0d": torch.tensor(0.6, device=CUDA),
        "row": (torch.rand(b, generator=gen) + 0.5).to(CUDA),
        "elem": (torch.rand(b, *s, generator=gen) + 0.5).to(CUDA),
        "expanded": (torch.rand(1, *s, generator=gen) + 0.5).to(CUDA).expand(b, *s),
    }


def _ints(as_tensor: bool, seed: int, rnd: int, offset: int) -> dict:
    if not as_tensor:
        return dict(seed=seed, round=rnd, row_offset=offset)
    return {name: torch.tensor(v, device=CUDA) for name, v in
            (("seed", seed), ("round", rnd), ("row_offset", offset))}  # fmt: skip


def _each_form_once(names: list[str], sigma_names: list[str]) -> list[tuple[str, str]]:
    """(mu form, sigma form) pairs that give each form once (few kernel variants to compile)."""
    return [(name, "float") for name in names] + [("elem", name) for name in sigma_names]


@pytest.mark.parametrize("gpu_backend", ["triton", "cuda"])
def test_sample_perturb_every_argument_form_is_capturable(monkeypatch, gpu_backend) -> None:
    _use_gpu_backend(monkeypatch, gpu_backend)
    b, k, s = 2, 3, (4, 33)
    mean = torch.randn(b, *s, device=CUDA).bfloat16()
    forms = _forms(b, s)
    for i, (mu_form, sigma_form) in enumerate(_each_form_once(list(forms), list(forms))):
        scale = forms[("float", "0d", "row")[i % 3]]
        args = (mean, forms[mu_form], forms[sigma_form], scale)
        kw = dict(k=k, **_ints(i % 2 == 1, 11, 2, 1))  # int and tensor seeds in turn
        for validate in (True, False):  # the operator, and the fast path's plan
            kw_v = kw | dict(validate=validate)
            got = _replayed(lambda args=args, kw_v=kw_v: sample_perturb(*args, **kw_v))
            want = sample_perturb(*args, **kw)
            assert torch.equal(got, want), (mu_form, sigma_form, i, validate)


@pytest.mark.parametrize("gpu_backend", ["triton", "cuda"])
@pytest.mark.parametrize("per_element", [True, False])
def test_cem_update_every_argument_form_is_capturable(monkeypatch, gpu_backend, per_element):
    _use_gpu_backend(monkeypatch, gpu_backend)
    b, k, t, s = 3, 8, 3, (4, 600)  # several blocks a row
    idx = torch.stack([torch.randperm(k)[:t] for _ in range(b)]).to(CUDA)
    forms = _forms(b, s)
    sigma_forms = list(forms) if per_element else ["float", "0d", "row"]
    for i, (mu_form, sigma_form) in enumerate(_each_form_once(list(forms), sigma_forms)):
        counts = torch.tensor([0, 1, 3], device=CUDA) if i % 2 else None
        args = (forms[mu_form], forms[sigma_form], idx)
        kw = dict(shape=(b, *s), k=k, alpha=0.7, min_sigma=0.05, per_element=per_element,
                  counts=counts, **_ints(i % 3 == 1, 5, 1, 2))  # fmt: skip
        for validate in (True, False):
            kw_v = kw | dict(validate=validate)
            got = _replayed(lambda args=args, kw_v=kw_v: cem_update(*args, **kw_v))
            want = cem_update(*args, **kw)
            for g, w in zip(got, want, strict=True):
                assert torch.equal(g, w), (mu_form, sigma_form, i, validate)


@pytest.mark.parametrize("t_form", ["float", "0d", "row"])
def test_x0_estimate_every_argument_form_is_capturable(t_form) -> None:
    z = torch.randn(4, 3, 40, device=CUDA).half()
    v = torch.randn(4, 3, 40, device=CUDA)
    t = {"float": 0.3, "0d": torch.tensor(0.4, device=CUDA),
         "row": torch.rand(4, device=CUDA)}[t_form]  # fmt: skip
    for validate in (True, False):
        kw = dict(scaling=1.5, shift=0.1, validate=validate)
        got = _replayed(lambda kw=kw: x0_estimate(z, v, t, **kw))
        assert torch.equal(got, x0_estimate(z, v, t, scaling=1.5, shift=0.1))
