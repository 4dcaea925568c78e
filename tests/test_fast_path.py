"""The eager fast path (validate=False): cached plans give the slow path's results, bit for
bit, on every backend and argument form, and still refuse every bad argument."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import use_backend

from smartgrpo_fast.ops import cem_update, sample_perturb, topk_select, x0_estimate
from smartgrpo_fast.ops._fast import PLAN_LIMIT, PlanCache

SP = sys.modules["smartgrpo_fast.ops.sample_perturb"]
CEM = sys.modules["smartgrpo_fast.ops.cem_update"]
X0 = sys.modules["smartgrpo_fast.ops.x0_estimate"]
TOPK = sys.modules["smartgrpo_fast.ops.topk_select"]
B, K, T, S = 2, 5, 3, (3, 4, 5)


@pytest.fixture(autouse=True)
def fresh_plans() -> None:
    for module in (SP, CEM, X0, TOPK):
        module._PLANS.clear()


def _forms() -> dict:
    """Every form of a float parameter, with odd layouts: (B, *S) permuted, expanded, float64,
    broadcast from (*S,) and (1, *S)."""
    gen = torch.Generator().manual_seed(0)
    full = torch.rand(B, *S, generator=gen) + 0.5
    return {
        "float": 0.8,
        "int": 1,
        "0d": torch.tensor(0.9),
        "row": torch.rand(B, generator=gen) + 0.5,
        "row_strided": (torch.rand(2 * B, generator=gen) + 0.5)[::2],
        "elem": full,
        "elem_permuted": full.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1),
        "elem_f64": full.double(),
        "elem_bf16": full.bfloat16(),
        "broadcast_s": full[0],
        "broadcast_1s": full[:1].expand(B, *S),
    }


def _twice(fn, *args, **kwargs):
    """fn with validate=False twice (builds the plan, then runs it) and once validated."""
    first = fn(*args, validate=False, **kwargs)
    second = fn(*args, validate=False, **kwargs)
    slow = fn(*args, validate=True, **kwargs)
    return first, second, slow


def _equal(a, b) -> bool:
    if isinstance(a, tuple):
        return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    return torch.equal(a, b)


@pytest.mark.parametrize("mean_form", ["contiguous", "strided", "2d"])
def test_sample_perturb_fast_equals_slow(backend, mean_form) -> None:
    gen = torch.Generator().manual_seed(1)
    mean = torch.randn(B, *S, generator=gen)
    if mean_form == "strided":
        mean = torch.randn(B, *S[:-1], 2 * S[-1], generator=gen)[..., ::2].bfloat16()
    forms = _forms()
    if mean_form == "2d":
        mean = mean.reshape(B, -1)
        forms = {n: f.reshape(B, -1) if n == "elem" else f for n, f in forms.items()
                 if n in ("float", "row", "elem")}  # fmt: skip
    # each form once as mu and once as sigma (the other plain), int and tensor seeds in turn
    cases = [(name, "float") for name in forms] + [("row", name) for name in forms]
    for i, (mu_name, sigma_name) in enumerate(cases):
        scale = 0.5 if i % 2 else torch.tensor([0.3, 1.2])
        seed, rnd, offset = (7, 2, 1) if i % 3 else (torch.tensor(7), torch.tensor(2), 1)
        got = _twice(sample_perturb, mean, forms[mu_name], forms[sigma_name], scale, k=K,
                     seed=seed, round=rnd, row_offset=offset)  # fmt: skip
        assert _equal(got[0], got[2]) and _equal(got[1], got[2]), (mu_name, sigma_name)


@pytest.mark.parametrize("per_element", [True, False])
@pytest.mark.parametrize("with_counts", [False, True])
def test_cem_update_fast_equals_slow(backend, per_element, with_counts) -> None:
    gen = torch.Generator().manual_seed(2)
    idx = torch.stack([torch.randperm(K, generator=gen)[:T] for _ in range(B)])
    counts = torch.tensor([0, 2]) if with_counts else None
    forms = _forms()
    sigma_names = list(forms) if per_element else ["float", "int", "0d", "row", "row_strided"]
    cases = [(name, "float") for name in forms] + [("elem", name) for name in sigma_names]
    for i, (mu_name, sigma_name) in enumerate(cases):
        seed, rnd, offset = (3, 4, 0) if i % 3 else (torch.tensor(3), 4, torch.tensor(2))
        kw = dict(shape=(B, *S), k=K, seed=seed, round=rnd, row_offset=offset, alpha=0.7,
                  min_sigma=0.05, per_element=per_element, counts=counts)  # fmt: skip
        elites = idx if i % 2 else idx.int()
        got = _twice(cem_update, forms[mu_name], forms[sigma_name], elites, **kw)
        assert _equal(got[0], got[2]), (mu_name, sigma_name)
        assert _equal(got[1], got[2]), (mu_name, sigma_name)


@pytest.mark.parametrize("dtypes", [(torch.float32,) * 2, (torch.bfloat16, torch.float32)])
def test_x0_estimate_fast_equals_slow(backend, dtypes) -> None:
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(4, 3, 6, generator=gen).to(dtypes[0])
    v = torch.randn(4, 6, 3, generator=gen).to(dtypes[1]).transpose(1, 2)  # non-contiguous
    for t in (0.3, 1, torch.tensor(0.4), torch.rand(4, generator=gen), torch.rand(8)[::2]):
        got = _twice(x0_estimate, z, v, t, scaling=1.5305, shift=0.0609)
        assert _equal(got[0], got[2]) and _equal(got[1], got[2])
    z1, v1 = z[:, 0, 0].contiguous(), v[:, 0, 0].contiguous()  # (N,): S = ()
    got = _twice(x0_estimate, z1, v1, 0.5)
    assert _equal(got[0], got[2]) and _equal(got[1], got[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_topk_select_fast_equals_slow(backend, dtype) -> None:
    """NaN, signed zeros, infinities and ties, contiguous and transposed rewards, K = 1 and
    T = K: the plan's indices are the validated call's."""
    gen = torch.Generator().manual_seed(4)
    r = torch.randn(6, 9, generator=gen)
    r[:, ::4] = float("nan")
    r[:, 1::3] = r[:, 1:2]  # ties
    r[0, 2], r[0, 3], r[1, 2], r[1, 3] = 0.0, -0.0, float("inf"), float("-inf")
    r = r.to(dtype)
    for rewards in (r, r.t().contiguous().t(), r[:, :1]):
        for t in sorted({1, 3, rewards.shape[1]}):
            if t > rewards.shape[1]:
                continue
            got = _twice(topk_select, rewards, t)
            assert _equal(got[0], got[2]) and _equal(got[1], got[2]), (rewards.stride(), t)


def test_topk_select_bad_forms_raise_and_are_not_cached() -> None:
    with pytest.raises(ValueError, match=r"^t: expected 1 <= t <= K = 4, got 5"):
        topk_select(torch.zeros(2, 4), 5, validate=False)
    with pytest.raises(TypeError, match=r"^rewards: expected dtype in"):
        topk_select(torch.zeros(2, 4, dtype=torch.int64), 2, validate=False)
    with pytest.raises(TypeError, match=r"^t: expected an int"):
        topk_select(torch.zeros(2, 4), True, validate=False)
    assert len(TOPK._PLANS) == 0
    topk_select(torch.zeros(2, 4), 2, validate=False)
    topk_select(torch.zeros(2, 4), 3, validate=False)  # t fixes the output: its own plan
    assert len(TOPK._PLANS) == 2


def test_bad_values_still_raise_after_a_plan_is_cached() -> None:
    """A plan only holds forms: every value no key holds is checked again at each call."""
    mean = torch.zeros(2, 3)
    sample_perturb(mean, 0.0, 1.0, 1.0, k=2, seed=0, validate=False)  # caches the plan
    bad_calls = [
        (dict(mu=float("nan")), r"^mu: expected a finite number"),
        (dict(sigma=-1.0), r"^sigma: expected a value >= 0"),
        (dict(scale=float("inf")), r"^scale: expected a finite number"),
        (dict(seed=2**64), r"^seed: expected 0 <= seed < "),
        (dict(seed=-1), r"^seed: expected 0 <= seed < "),
        (dict(round=2**32), r"^round: expected 0 <= round < "),
        (dict(row_offset=2**32 - 1), r"^row_offset: expected 0 <= row_offset"),
    ]
    for change, message in bad_calls:
        kw = dict(mu=0.0, sigma=1.0, scale=1.0, seed=0, round=0, row_offset=0) | change
        with pytest.raises(ValueError, match=message):
            sample_perturb(mean, kw.pop("mu"), kw.pop("sigma"), kw.pop("scale"), k=2,
                           validate=False, **kw)  # fmt: skip
    with pytest.raises(TypeError, match=r"^seed: expected an int"):
        sample_perturb(mean, 0.0, 1.0, 1.0, k=2, seed=True, validate=False)
    with pytest.raises(TypeError, match=r"^k: expected an int"):
        sample_perturb(mean, 0.0, 1.0, 1.0, k=True, seed=0, validate=False)

    idx = torch.tensor([[0, 1], [1, 0]])
    kw = dict(shape=(2, 3), k=2, seed=0, round=0, validate=False)
    cem_update(0.0, 1.0, idx, **kw)
    for change, message in (
        (dict(alpha=0.0), r"^alpha: expected 0 < alpha <= 1"),
        (dict(alpha=True), r"^alpha: expected a float"),
        (dict(min_sigma=-0.1), r"^min_sigma: expected a value >= 0"),
        (dict(min_sigma=float("nan")), r"^min_sigma: expected a finite number"),
        (dict(row_offset=2**32 - 1), r"^row_offset: expected 0 <= row_offset"),
    ):
        with pytest.raises((ValueError, TypeError), match=message):
            cem_update(0.0, 1.0, idx, **kw, **change)
    with pytest.raises(TypeError, match=r"^shape: expected a tuple of ints"):
        cem_update(0.0, 1.0, idx, **(kw | dict(shape=(2, True))))
    with pytest.raises(ValueError, match=r"^sigma: expected a value >= 0"):
        cem_update(0.0, -1.0, idx, **kw)

    z = torch.zeros(2, 3)
    x0_estimate(z, z, 0.5, validate=False)
    with pytest.raises(ValueError, match=r"^scaling: expected a non-zero number"):
        x0_estimate(z, z, 0.5, scaling=0.0, validate=False)
    with pytest.raises(ValueError, match=r"^t: expected a finite number"):
        x0_estimate(z, z, float("nan"), validate=False)
    with pytest.raises(ValueError, match=r"^v: expected shape"):
        x0_estimate(z, torch.zeros(2, 4), 0.5, validate=False)


def test_bad_forms_raise_and_are_not_cached() -> None:
    mean = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"^mu: expected a number, a \(2,\) tensor"):
        sample_perturb(mean, torch.zeros(3, 3), 1.0, 1.0, k=2, seed=0, validate=False)
    with pytest.raises(ValueError, match=r"^mu: expected a number, a \(2,\) tensor"):
        sample_perturb(mean, torch.zeros(3, 3), 1.0, 1.0, k=2, seed=0, validate=False)
    assert len(SP._PLANS) == 0
    with pytest.raises(ValueError, match=r"requires grad"):
        sample_perturb(mean.requires_grad_(), 0.0, 1.0, 1.0, k=2, seed=0, validate=False)
    with torch.no_grad():  # the same forms without grad mode: served
        sample_perturb(mean, 0.0, 1.0, 1.0, k=2, seed=0, validate=False)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: x0_estimate(None, None, 0.5, validate=False), r"^z: expected a torch.Tensor"),
        (lambda: sample_perturb([1.0], 0.0, 1.0, 1.0, k=2, seed=0, validate=False),
         r"^mean: expected a torch.Tensor"),
        (lambda: sample_perturb(torch.zeros(2, 3), 0.0, 1.0, 1.0, k=[2], seed=0, validate=False),
         r"^k: expected an int"),
        (lambda: cem_update(0.0, 1.0, [[0]], shape=(1, 3), k=2, seed=0, round=0, validate=False),
         r"^elite_idx: expected a \(B, T\) int64 tensor"),
        (lambda: cem_update(0.0, 1.0, torch.zeros(1, 1, dtype=torch.int64), shape=3, k=2, seed=0,
                            round=0, validate=False), r"^shape: expected a tuple of ints"),
        (lambda: topk_select([[1.0]], 1, validate=False), r"^rewards: expected a torch.Tensor"),
        (lambda: topk_select(torch.zeros(1, 3), [1], validate=False), r"^t: expected an int"),
    ],
)  # fmt: skip
def test_malformed_arguments_get_the_checks_errors(call, message) -> None:
    """No tensor where one is expected, or an unhashable value: the plan key cannot be built,
    and the call raises the argument checks' error (not an AttributeError of the key)."""
    with pytest.raises(TypeError, match=message):
        call()


def test_the_backend_is_read_at_every_call(monkeypatch) -> None:
    """Setting SMARTGRPO_BACKEND between two calls of the same forms takes effect."""
    mean = torch.zeros(1, 8)
    use_backend(monkeypatch, "cpp")
    sample_perturb(mean, 0.0, 1.0, 1.0, k=2, seed=0, validate=False)
    calls = []
    real = SP.sample_perturb_reference
    monkeypatch.setattr(SP, "sample_perturb_reference",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))  # fmt: skip
    sample_perturb(mean, 0.0, 1.0, 1.0, k=2, seed=0, validate=False)
    assert calls == []
    monkeypatch.setenv("SMARTGRPO_BACKEND", "reference")
    sample_perturb(mean, 0.0, 1.0, 1.0, k=2, seed=0, validate=False)
    assert calls == [1]


def test_x0_estimate_under_autograd_takes_the_operator(backend) -> None:
    z = torch.randn(3, 4, requires_grad=True)
    v = torch.randn(3, 4)
    t = torch.rand(3, requires_grad=True)
    x0 = x0_estimate(z, v, t, scaling=2.0, validate=False)
    x0.sum().backward()
    assert torch.allclose(z.grad, torch.full((3, 4), 0.5))
    assert torch.allclose(t.grad, -(v.sum(dim=1)) / 2.0)


def test_the_plan_cache_is_bounded() -> None:
    cache = PlanCache()
    for i in range(PLAN_LIMIT + 3):
        cache.put(i, None)
    assert 0 < len(cache) <= PLAN_LIMIT
