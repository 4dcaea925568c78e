"""The ops as torch.library operators: ``opcheck`` on every operator (the public ones, the C++
``*_out`` ones with their fake kernels), and ``torch.compile(fullgraph=True)`` over a search
step that calls all five ops: no graph break, the eager results bit for bit, x0_estimate's
gradient, and, on a GPU, the Triton kernels traced through ``triton_op``/``wrap_triton``.

The operator arguments are built by the helpers of ``smartgrpo_fast.ops._library`` (the forms
the public functions pass), on deliberately odd inputs: K = 1, non-contiguous and stride-0
tensors, tensor seeds (one >= 2**63), rounds, row offsets and counts.
"""

from __future__ import annotations

import pytest
import torch
from conftest import use_backend

from smartgrpo_fast.ops import (
    cem_update,
    philox_normal,
    sample_perturb,
    topk_select,
    x0_estimate,
)
from smartgrpo_fast.ops._cpp import cpu_extension
from smartgrpo_fast.ops._library import int_arg, param_arg, seed_arg
from smartgrpo_fast.ops._triton import HAS_TRITON, interpreting

OPS = torch.ops.smartgrpo_fast

#: The schemas of the public operators (``smartgrpo_fast::<op>_triton`` take the same).
SCHEMAS = {
    "sample_perturb": (
        "sample_perturb(Tensor mean, Tensor? mu, float mu_val, Tensor? sigma, float sigma_val, "
        "Tensor? scale, float scale_val, SymInt k, Tensor? seed_t, SymInt seed_lo, "
        "SymInt seed_hi, Tensor? round_t, SymInt round, Tensor? row_offset_t, "
        "SymInt row_offset) -> Tensor"
    ),
    "x0_estimate": (
        "x0_estimate(Tensor z, Tensor v, Tensor? t, float t_val, float scaling, float shift) "
        "-> Tensor"
    ),
    "topk_select": "topk_select(Tensor rewards, SymInt t) -> Tensor",
    "cem_update": (
        "cem_update(Tensor? mu, float mu_val, Tensor? sigma, float sigma_val, Tensor elite_idx, "
        "SymInt[] shape, SymInt k, Tensor? seed_t, SymInt seed_lo, SymInt seed_hi, "
        "Tensor? round_t, SymInt round, Tensor? row_offset_t, SymInt row_offset, float alpha, "
        "float min_sigma, bool per_element, Tensor? counts) -> (Tensor, Tensor)"
    ),
    "philox_normal": (
        "philox_normal(SymInt[] shape, Tensor? seed_t, SymInt seed_lo, SymInt seed_hi, "
        "Tensor? round_t, SymInt round, Tensor? row_offset_t, SymInt row_offset, "
        "Device device) -> Tensor"
    ),
}

BIG_SEED = 2**63 + 12345  # a tensor seed holds it in two's complement (negative int64)


def _seed_tensor(seed: int) -> torch.Tensor:
    return torch.tensor(seed - 2**64 if seed >= 2**63 else seed, dtype=torch.int64)


def _stream(seed, rnd, row_offset) -> tuple:
    return (*seed_arg(seed), *int_arg(rnd), *int_arg(row_offset))


def test_schemas_are_registered() -> None:
    for name, schema in SCHEMAS.items():
        assert str(getattr(OPS, name).default._schema) == f"smartgrpo_fast::{schema}"
        if HAS_TRITON:
            triton_schema = str(getattr(OPS, f"{name}_triton").default._schema)
            assert triton_schema == f"smartgrpo_fast::{name}_triton" + schema[len(name) :]


# --------------------------------------------------------------------------------------
# opcheck on CPU tensors
# --------------------------------------------------------------------------------------


def _sample_perturb_cases() -> dict[str, tuple]:
    gen = torch.Generator().manual_seed(1)
    plain = torch.randn(2, 3, 5, generator=gen)
    # K = 1, a non-contiguous bfloat16 mean, a stride-0 per-element mu, tensor stream words
    odd = torch.randn(2, 5, 3, generator=gen).bfloat16().transpose(1, 2)
    mu_e = torch.randn(1, 3, 5, generator=gen)
    big = _seed_tensor(BIG_SEED)
    return {
        "floats": (plain, 0.1, 0.9, 0.5, 4, 7, 0, 0),
        "k1-bf16-strided-tensors": (odd, mu_e, torch.rand(2, generator=gen), torch.tensor(0.3),
                                    1, big, torch.tensor(3), torch.tensor(5)),
        "sliced-rows": (plain[:, :, ::2], torch.rand(2, generator=gen, dtype=torch.float64), 1.0,
                        torch.rand(4, generator=gen)[::2], 3, 2**40 + 1, 2, 7),
    }  # fmt: skip


def _sample_perturb_args(mean, mu, sigma, scale, k, seed, rnd, row_offset) -> tuple:
    b, inner = mean.shape[0], tuple(mean.shape[1:])
    return (
        mean,
        *param_arg(mu, b, inner),
        *param_arg(sigma, b, inner),
        *param_arg(scale, b, (1,)),
        k,
        *_stream(seed, rnd, row_offset),
    )


def _x0_cases() -> dict[str, tuple]:
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(6, 2, 4, generator=gen)
    z16 = torch.randn(6, 4, 2, generator=gen).half().transpose(1, 2)
    v16 = torch.randn(6, 2, 4, generator=gen).bfloat16()
    t_rows = torch.rand(12, generator=gen, dtype=torch.float64)[::2]
    return {
        "float-t": (z, torch.randn(6, 2, 4, generator=gen), 0.4, 1.5, 0.1),
        "mixed-dtypes-strided": (z16, v16, t_rows, 1.5305, 0.0609),
        "one-row-0d-t": (torch.randn(1, 7, generator=gen), torch.randn(1, 7, generator=gen),
                         torch.tensor(0.7), 1.0, 0.0),
    }  # fmt: skip


def _x0_args(z, v, t, scaling, shift) -> tuple:
    return (z, v, *param_arg(t, z.shape[0], (1,)), float(scaling), float(shift))


def _topk_cases() -> dict[str, tuple]:
    gen = torch.Generator().manual_seed(3)
    r = torch.randn(3, 8, generator=gen)
    r[0, 2] = float("nan")
    r[1, 4] = r[1, 6]  # a tie
    return {
        "nan-tie": (r, 3),
        "k1": (torch.randn(2, 1, generator=gen), 1),
        "f16-transposed": (torch.randn(9, 4, generator=gen).half().t(), 5),
        "f64": (torch.randn(2, 6, generator=gen, dtype=torch.float64), 2),
    }


def _cem_cases() -> dict[str, tuple]:
    gen = torch.Generator().manual_seed(4)
    idx = torch.tensor([[3, 1], [0, 2]])
    idx32_t = torch.tensor([[1, 0], [3, 2]], dtype=torch.int32).t()  # non-contiguous int32
    mu_e = torch.randn(2, 3, 5, generator=gen)
    # (mu, sigma, elite_idx, shape, k, seed, round, row_offset, per_element, counts)
    return {
        "floats": (0.0, 1.0, idx, (2, 3, 5), 4, 11, 0, 0, True, None),
        "pooled-counts-tensors": (mu_e, torch.rand(2, generator=gen) + 0.5, idx32_t, (2, 3, 5),
                                  4, _seed_tensor(BIG_SEED), torch.tensor(2), torch.tensor(9),
                                  False, torch.tensor([2, 0])),
        "k1-transposed-mu": (mu_e[:, :, ::2].contiguous().transpose(1, 2), 0.7,
                             torch.zeros(2, 1, dtype=torch.int64), (2, 3, 3), 1, 5, 1, 3, True,
                             torch.tensor([1, 1])),
    }  # fmt: skip


def _cem_args(mu, sigma, idx, shape, k, seed, rnd, row_offset, per_element, counts) -> tuple:
    b, inner = shape[0], tuple(shape[1:])
    return (
        *param_arg(mu, b, inner),
        *param_arg(sigma, b, inner),
        idx,
        list(shape),
        k,
        *_stream(seed, rnd, row_offset),
        0.8,
        0.05,
        per_element,
        counts,
    )


def _philox_cases() -> dict[str, tuple]:
    return {
        "ints": ([2, 3, 5], 7, 0, 0),
        "k1-tensors": ([1, 1, 7], _seed_tensor(BIG_SEED), torch.tensor(4), torch.tensor(2**31)),
    }


def _philox_args(shape, seed, rnd, row_offset) -> tuple:
    return (shape, *_stream(seed, rnd, row_offset), torch.device("cpu"))


def _all_cases() -> dict[str, tuple[str, tuple]]:
    """``{"<op>-<label>": (op, operator arguments)}``."""
    builders = {
        "sample_perturb": (_sample_perturb_cases, _sample_perturb_args),
        "x0_estimate": (_x0_cases, _x0_args),
        "topk_select": (_topk_cases, lambda *c: c),
        "cem_update": (_cem_cases, _cem_args),
        "philox_normal": (_philox_cases, _philox_args),
    }
    return {
        f"{op}-{label}": (op, pack(*case))
        for op, (cases, pack) in builders.items()
        for label, case in cases().items()
    }


_CASES = _all_cases()
#: One case per op for the slow interpreted-Triton runs: K = 1 and tensor stream words.
_INTERPRETED = ["sample_perturb-k1-bf16-strided-tensors", "x0_estimate-mixed-dtypes-strided",
                "topk_select-f16-transposed", "cem_update-pooled-counts-tensors",
                "philox_normal-k1-tensors"]  # fmt: skip


@pytest.mark.parametrize("name,args", _CASES.values(), ids=_CASES.keys())
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_opcheck_public_ops(monkeypatch, backend: str, name: str, args: tuple) -> None:
    """Schema, fake kernel (shapes, dtypes and strides against the real output), autograd
    registration and AOTDispatcher tracing (dynamic shapes) of ``smartgrpo_fast::<op>``."""
    use_backend(monkeypatch, backend)
    torch.library.opcheck(getattr(OPS, name).default, args)


def test_opcheck_on_the_interpreted_triton_backend(monkeypatch) -> None:
    """The public operators run the (interpreted) Triton kernels behind the same fakes."""
    use_backend(monkeypatch, "triton")
    for name, args in (_CASES[case] for case in _INTERPRETED):
        torch.library.opcheck(getattr(OPS, name).default, args)


def test_opcheck_x0_estimate_autograd(monkeypatch) -> None:
    """register_autograd: the backward (z, v and a per-row t) traced by AOTDispatcher."""
    use_backend(monkeypatch, "cpp")
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(4, 3, 2, generator=gen).transpose(1, 2).requires_grad_()
    v = torch.randn(4, 2, 3, generator=gen, requires_grad=True)
    t = torch.rand(4, generator=gen, requires_grad=True)
    torch.library.opcheck(OPS.x0_estimate.default, (z, v, t, 0.0, 1.5, 0.1))
    torch.library.opcheck(OPS.x0_estimate.default, (z, v, None, 0.3, 2.0, 0.0))


def test_x0_estimate_gradient_against_the_formula(backend) -> None:
    """The registered backward against autograd of plain PyTorch (an independent oracle: every
    backend, the reference included, now differentiates through the operator)."""
    gen = torch.Generator().manual_seed(6)
    z0 = torch.randn(4, 3, 6, generator=gen)
    v0 = torch.randn(4, 3, 6, generator=gen)
    t0 = torch.rand(4, generator=gen)
    g = torch.randn(4, 3, 6, generator=gen)
    for t_form in ("rows", "0d"):
        leaves = [z0.clone().requires_grad_(), v0.clone().requires_grad_()]
        t = (t0 if t_form == "rows" else t0[1]).clone().requires_grad_()
        (x0_estimate(*leaves, t, scaling=2.0, shift=0.1) * g).sum().backward()
        ref = [z0.clone().requires_grad_(), v0.clone().requires_grad_()]
        t_ref = t.detach().clone().requires_grad_()
        tt = t_ref.reshape(-1, 1, 1) if t_form == "rows" else t_ref
        (((ref[0] - tt * ref[1]) / 2.0 + 0.1) * g).sum().backward()
        for name, a, b in (("z", leaves[0], ref[0]), ("v", leaves[1], ref[1]), ("t", t, t_ref)):
            assert a.grad.shape == b.grad.shape, name
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5, msg=name)


_CPP_OUT_CASES = ["sample_perturb_out", "x0_estimate_out", "cem_update_out",
                  "philox_normal_out", "philox_bits_out"]  # fmt: skip


@pytest.mark.parametrize("name", _CPP_OUT_CASES)
def test_opcheck_cpp_out_ops(monkeypatch, name: str) -> None:
    """The C++ ops' schemas (outputs declared mutated) and their fake kernels."""
    use_backend(monkeypatch, "cpp")
    assert cpu_extension().ok
    cases = {
        "sample_perturb_out": [
            (torch.empty(m.shape[0], k, *m.shape[1:], dtype=m.dtype), m.reshape(m.shape[0], -1),
             *_sample_perturb_args(m, mu, s, sc, k, seed, r, o)[1:7], *_stream(seed, r, o))
            for m, mu, s, sc, k, seed, r, o in _sample_perturb_cases().values()
        ],
        "x0_estimate_out": [
            (torch.empty(z.shape, dtype=torch.promote_types(z.dtype, v.dtype)),
             z.reshape(z.shape[0], -1), v.reshape(v.shape[0], -1),
             *param_arg(t, z.shape[0], (1,)), s, sh)
            for z, v, t, s, sh in _x0_cases().values()
        ],
        "cem_update_out": [
            (torch.empty(shape), torch.empty(shape if pe else shape[:1]),
             *(a := _cem_args(mu, sg, idx, shape, k, seed, r, o, pe, c))[:5], k,
             *a[7:14], *a[14:])
            for mu, sg, idx, shape, k, seed, r, o, pe, c in _cem_cases().values()
        ],
        "philox_normal_out": [
            (torch.empty(shape), *_stream(seed, r, o))
            for shape, seed, r, o in _philox_cases().values()
        ],
        "philox_bits_out": [
            (torch.empty(5, 4, dtype=torch.int64),
             torch.randint(0, 2**32, (5, 4), dtype=torch.int64), 123, 2**32 - 1),
        ],
    }[name]  # fmt: skip
    for args in cases:
        torch.library.opcheck(getattr(OPS, name).default, args)


def test_opcheck_cpp_packed_ops_and_their_results(monkeypatch) -> None:
    """The packed overloads (the fast path's: scalars in two lists) check like the plain ones
    and write what the plain ones write."""
    use_backend(monkeypatch, "cpp")
    assert cpu_extension().ok
    gen = torch.Generator().manual_seed(8)
    mean = torch.randn(2, 3, 4, generator=gen)  # (B, *S): the C++ ops view it as (B, D)
    mu = torch.randn(2, 3, 4, generator=gen)
    sigma = torch.rand(2, generator=gen) + 0.5
    out = torch.empty(2, 5, 3, 4)
    args = (out, mean, mu, sigma, None, [0.0, 0.0, 0.7], [5, 1, 2, 1])
    torch.library.opcheck(OPS.sample_perturb_out.packed, args)
    plain = torch.empty_like(out)
    OPS.sample_perturb_out(plain, mean.reshape(2, -1), mu.reshape(2, -1), 0.0, sigma, 0.0, None,
                           0.7, None, 5, 1, None, 2, None, 1)  # fmt: skip
    OPS.sample_perturb_out.packed(*args)
    assert torch.equal(out, plain)
    idx = torch.tensor([[0, 2], [1, 3]])
    for per_element in (1, 0):
        sigma_shape = (2, 3, 4) if per_element else (2,)
        outs = (torch.empty(2, 3, 4), torch.empty(sigma_shape))
        args = (*outs, mu, sigma, idx, torch.tensor([2, 1]), [0.0, 0.0, 0.7, 0.05],
                [5, 3, 0, 2, 1, per_element])  # fmt: skip
        torch.library.opcheck(OPS.cem_update_out.packed, args)
        OPS.cem_update_out.packed(*args)
        plain = (torch.empty(2, 3, 4), torch.empty(sigma_shape))
        OPS.cem_update_out(*plain, mu.reshape(2, -1), 0.0, sigma, 0.0, idx, 5, None, 3, 0, None,
                           2, None, 1, 0.7, 0.05, bool(per_element),
                           torch.tensor([2, 1]))  # fmt: skip
        assert torch.equal(outs[0], plain[0]) and torch.equal(outs[1], plain[1])


# --------------------------------------------------------------------------------------
# torch.compile(fullgraph=True)
# --------------------------------------------------------------------------------------

B, K, T, S = 2, 4, 2, (3, 5)


def search_step(mean, mu, sigma, scale, v, seed, rnd, row_offset):
    """One CEM round on the five ops, as the search runs it (rewards: a stand-in)."""
    z = sample_perturb(mean, mu, sigma, scale, k=K, seed=seed, round=rnd, row_offset=row_offset)
    x0 = x0_estimate(z.flatten(0, 1), v, 0.7, scaling=1.5, shift=0.1)
    rewards = x0.flatten(1).mean(1).view(B, K)
    elite = topk_select(rewards, T)
    counts = torch.isfinite(rewards).sum(1).clamp(max=T)
    mu_new, sigma_new = cem_update(
        mu, sigma, elite, shape=mean.shape, k=K, seed=seed, round=rnd, row_offset=row_offset,
        counts=counts, per_element=False,
    )  # fmt: skip
    n = philox_normal((B, K, *S), seed=seed, round=rnd, row_offset=row_offset)
    return z, x0, elite, mu_new, sigma_new, n


def _step_inputs(device: str = "cpu") -> tuple:
    gen = torch.Generator().manual_seed(7)
    mean = torch.randn(B, S[1], S[0], generator=gen).transpose(1, 2)  # non-contiguous
    mu = torch.randn(B, *S, generator=gen) * 0.1
    sigma = torch.rand(B, generator=gen) + 0.5
    scale = torch.tensor(0.6)
    v = torch.randn(B * K, *S, generator=gen)
    stream = torch.tensor(BIG_SEED - 2**64), torch.tensor(1), torch.tensor(3)
    return tuple(x.to(device) for x in (mean, mu, sigma, scale, v, *stream))


def _graph_targets(fn, *args) -> set[str]:
    """The smartgrpo_fast operators in the graph(s) dynamo traces for ``fn``; asserts no graph
    break."""
    torch._dynamo.reset()
    explain = torch._dynamo.explain(fn)(*args)
    assert explain.graph_break_count == 0, explain.break_reasons
    assert explain.graph_count == 1
    targets = set()
    for node in explain.graphs[0].graph.nodes:
        name = str(node.target).removesuffix(".default")
        if node.op == "call_function" and name.startswith("smartgrpo_fast."):
            targets.add(name)
    return targets


def _assert_same(got: tuple, want: tuple, **tol) -> None:
    names = ("z", "x0", "elite", "mu_new", "sigma_new", "n")
    for name, a, b in zip(names, got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=tol.get("rtol", 0), atol=tol.get("atol", 0),
                                   equal_nan=True, msg=name)  # fmt: skip


@pytest.mark.parametrize(
    "backend,compiler",
    [("cpp", "inductor"), ("reference", "aot_eager"), ("triton", "aot_eager")],
)
def test_compiled_search_step_is_one_graph_with_the_eager_results(
    monkeypatch, backend: str, compiler: str
) -> None:
    """fullgraph=True (a graph break raises), no break in dynamo's explanation, the opaque
    operators in the graph, and the eager results bit for bit, again after the round tensor
    changes in place (read inside the ops: no recompile)."""
    use_backend(monkeypatch, backend)
    args = _step_inputs()
    names = {f"smartgrpo_fast.{op}" for op in SCHEMAS}
    assert _graph_targets(search_step, *args) == names
    torch._dynamo.reset()
    compiled = torch.compile(search_step, fullgraph=True, backend=compiler)
    _assert_same(compiled(*args), search_step(*args))
    args[-2].fill_(2)  # round 1 -> 2
    with torch.compiler.set_stance("fail_on_recompile"):
        got = compiled(*args)
    _assert_same(got, search_step(*args))
    torch._dynamo.reset()


def test_compiled_x0_estimate_gradient_matches_eager(monkeypatch) -> None:
    use_backend(monkeypatch, "cpp")
    gen = torch.Generator().manual_seed(8)
    z0, v0 = torch.randn(6, 2, 4, generator=gen), torch.randn(6, 2, 4, generator=gen)
    t0, g = torch.rand(6, generator=gen), torch.randn(6, 2, 4, generator=gen)

    def loss(z, v, t):
        return (x0_estimate(z, v, t, scaling=1.5, shift=0.2) * g).sum()

    def grads(fn):
        leaves = [x.clone().requires_grad_() for x in (z0, v0, t0)]
        fn(*leaves).backward()
        return [x.grad for x in leaves]

    torch._dynamo.reset()
    got = grads(torch.compile(loss, fullgraph=True, backend="aot_eager"))
    for name, a, b in zip("zvt", got, grads(loss), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"grad {name}")
    torch._dynamo.reset()


def test_validation_runs_eagerly_only(monkeypatch) -> None:
    """A bad value is a ValueError eagerly; the compiled graph holds no check (fullgraph would
    raise on the data-dependent reads) and passes it to the operator unchecked."""
    use_backend(monkeypatch, "reference")
    mean = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"^sigma: expected a value >= 0"):
        sample_perturb(mean, 0.0, -1.0, 1.0, k=2, seed=0)
    sigma = torch.tensor([1.0, float("nan")])
    with pytest.raises(ValueError, match=r"^sigma: expected finite values"):
        sample_perturb(mean, 0.0, sigma, 1.0, k=2, seed=0)
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda m, s: sample_perturb(m, 0.0, s, 1.0, k=2, seed=0), fullgraph=True,
        backend="eager",
    )  # fmt: skip
    z = compiled(mean, sigma)
    assert torch.isnan(z[1]).all() and not torch.isnan(z[0]).any()
    torch._dynamo.reset()


@pytest.mark.skipif(not (HAS_TRITON and interpreting()), reason="needs TRITON_INTERPRET=1")
def test_triton_ops_run_eagerly_under_the_interpreter(monkeypatch) -> None:
    """``smartgrpo_fast::<op>_triton`` (the triton_op bodies) give what the public operators
    give on the Triton backend. Tracing them needs compiled kernels: under the interpreter
    ``wrap_triton`` returns the interpreted function, which fake tensors cannot run, so
    torch.compile keeps the opaque operators there (see _library.trace_triton)."""
    use_backend(monkeypatch, "triton")
    for name, args in (_CASES[case] for case in _INTERPRETED):
        want = getattr(OPS, name)(*args)
        got = getattr(OPS, f"{name}_triton")(*args)
        for a, b in zip(*(x if isinstance(x, tuple) else (x,) for x in (got, want)), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=name)


# --------------------------------------------------------------------------------------
# CUDA: the Triton kernels traced into the graph (triton_op / wrap_triton)
# --------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_compiled_search_step_traces_the_triton_kernels_on_cuda(monkeypatch) -> None:
    """On CUDA tensors the graph calls ``smartgrpo_fast::<op>_triton``, Inductor compiles the
    kernels, and the results equal eager: the Philox stream and the elites bit for bit, the
    float outputs within 1 ulp-scale of float32 (Inductor may fuse the pooled-sigma epilogue of
    cem_update and the glue differently)."""
    use_backend(monkeypatch, "triton")
    args = _step_inputs("cuda")
    names = {f"smartgrpo_fast.{op}_triton" for op in SCHEMAS}
    assert _graph_targets(search_step, *args) == names
    torch._dynamo.reset()
    compiled = torch.compile(search_step, fullgraph=True)
    want = search_step(*args)
    got = compiled(*args)
    _assert_same(got, want, rtol=1e-6, atol=1e-6)
    for i in (2, 5):  # elites and the raw normals: exact
        assert torch.equal(got[i], want[i])
    args[-2].fill_(2)
    with torch.compiler.set_stance("fail_on_recompile"):
        got = compiled(*args)
    _assert_same(got, search_step(*args), rtol=1e-6, atol=1e-6)

    gen = torch.Generator().manual_seed(9)
    z0, v0 = (torch.randn(6, 2, 4, generator=gen).cuda() for _ in range(2))
    t0, g = torch.rand(6, generator=gen).cuda(), torch.randn(6, 2, 4, generator=gen).cuda()

    def loss(z, v, t):
        return (x0_estimate(z, v, t, scaling=1.5, shift=0.2) * g).sum()

    def grads(fn):
        leaves = [x.clone().requires_grad_() for x in (z0, v0, t0)]
        fn(*leaves).backward()
        return [x.grad for x in leaves]

    torch._dynamo.reset()
    for a, b in zip(grads(torch.compile(loss, fullgraph=True)), grads(loss), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.cuda
def test_opcheck_triton_ops_on_cuda(monkeypatch) -> None:
    """opcheck of the triton_op operators and of the public ones on CUDA tensors."""
    use_backend(monkeypatch, "triton")
    for name, args in _CASES.values():
        cuda_args = tuple(
            a.cuda() if isinstance(a, torch.Tensor)
            else torch.device("cuda") if isinstance(a, torch.device) else a
            for a in args
        )  # fmt: skip
        torch.library.opcheck(getattr(OPS, f"{name}_triton").default, cuda_args)
        torch.library.opcheck(getattr(OPS, name).default, cuda_args)
