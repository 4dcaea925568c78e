"""One test per validation rule: the error type, and a message that names the argument and
says what it got."""

from __future__ import annotations

import pytest
import torch

from smartgrpo_fast.ops import (
    cem_update,
    resolve_backend,
    sample_perturb,
    topk_select,
    x0_estimate,
)

MEAN = torch.zeros(2, 3, 4)
IDX = torch.tensor([[0, 1], [2, 3]])
CEM = dict(shape=(2, 3, 4), k=4, seed=0, round=0)


def sp(**kw):
    args = dict(mean=MEAN, mu=0.0, sigma=1.0, scale=1.0, k=2, seed=0)
    args.update(kw)
    return sample_perturb(**args)


def test_mean_integer_dtype() -> None:
    with pytest.raises(TypeError, match=r"^mean: expected dtype .*torch.int64"):
        sp(mean=torch.zeros(2, 3, dtype=torch.int64))


def test_mean_complex_dtype() -> None:
    with pytest.raises(TypeError, match=r"^mean: .*complex64"):
        sp(mean=torch.zeros(2, 3, dtype=torch.complex64))


def test_mean_not_a_tensor() -> None:
    with pytest.raises(TypeError, match=r"^mean: expected a torch.Tensor, got object of type list"):
        sp(mean=[[0.0]])


def test_mean_zero_dim() -> None:
    with pytest.raises(ValueError, match=r"^mean: expected at least 1 dimension"):
        sp(mean=torch.tensor(1.0))


def test_mu_not_broadcastable() -> None:
    with pytest.raises(ValueError, match=r"^mu: .*broadcastable to \(2, 3, 4\), got .*\(5,\)"):
        sp(mu=torch.zeros(5))


def test_sigma_integer_tensor() -> None:
    with pytest.raises(TypeError, match=r"^sigma: expected dtype"):
        sp(sigma=torch.ones(2, dtype=torch.int32))


def test_scale_per_element_refused() -> None:
    with pytest.raises(ValueError, match=r"^scale: expected a number, a 0-d tensor or shape"):
        sp(scale=torch.ones(2, 3, 4))


def test_mu_on_another_device() -> None:
    with pytest.raises(ValueError, match=r"^mu: expected a tensor on cpu.*device meta"):
        sp(mu=torch.zeros(2, device="meta"))


def test_k_below_one() -> None:
    with pytest.raises(ValueError, match=r"^k: expected an int >= 1, got 0"):
        sp(k=0)


def test_k_not_int() -> None:
    with pytest.raises(TypeError, match=r"^k: "):
        sp(k=2.0)


def test_negative_sigma_float() -> None:
    with pytest.raises(ValueError, match=r"^sigma: expected a value >= 0, got -0.5"):
        sp(sigma=-0.5)


def test_negative_sigma_tensor() -> None:
    with pytest.raises(ValueError, match=r"^sigma: expected values >= 0, got minimum -1.0"):
        sp(sigma=torch.tensor([1.0, -1.0]))


def test_nan_mu_tensor() -> None:
    with pytest.raises(ValueError, match=r"^mu: expected finite values, got 1 NaN/inf"):
        sp(mu=torch.tensor([0.0, float("nan")]))


def test_non_finite_scale_float() -> None:
    with pytest.raises(ValueError, match=r"^scale: expected a finite number, got nan"):
        sp(scale=float("nan"))


def test_non_finite_scale_tensor() -> None:
    with pytest.raises(ValueError, match=r"^scale: expected finite values"):
        sp(scale=torch.tensor([1.0, float("inf")]))


def test_value_checks_can_be_skipped() -> None:
    z = sp(scale=torch.tensor([1.0, float("inf")]), validate=False)
    assert torch.isinf(z[1]).all() or torch.isnan(z[1]).any()


def test_requires_grad_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^mean: .*requires grad.*not differentiable"):
        sp(mean=MEAN.clone().requires_grad_())


def test_x0_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"^v: expected shape \(2, 3\) \(z's shape\)"):
        x0_estimate(torch.zeros(2, 3), torch.zeros(3, 2), 0.5)


def test_x0_device_mismatch() -> None:
    with pytest.raises(ValueError, match=r"^v: expected a tensor on cpu"):
        x0_estimate(torch.zeros(2, 3), torch.zeros(2, 3, device="meta"), 0.5)


def test_x0_integer_v() -> None:
    with pytest.raises(TypeError, match=r"^v: expected dtype"):
        x0_estimate(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int32), 0.5)


def test_x0_non_finite_t_float() -> None:
    with pytest.raises(ValueError, match=r"^t: expected a finite number, got inf"):
        x0_estimate(torch.zeros(2, 3), torch.zeros(2, 3), float("inf"))


def test_x0_non_finite_t_tensor() -> None:
    with pytest.raises(ValueError, match=r"^t: expected finite values, got 1 NaN/inf"):
        x0_estimate(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0.5, float("nan")]))


def test_x0_t_wrong_rows() -> None:
    with pytest.raises(ValueError, match=r"^t: expected a number, a 0-d tensor or shape \(2,\)"):
        x0_estimate(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3))


def test_x0_zero_scaling() -> None:
    with pytest.raises(ValueError, match=r"^scaling: expected a non-zero number"):
        x0_estimate(torch.zeros(2, 3), torch.zeros(2, 3), 0.5, scaling=0.0)


def test_x0_non_finite_shift() -> None:
    with pytest.raises(ValueError, match=r"^shift: expected a finite number"):
        x0_estimate(torch.zeros(2, 3), torch.zeros(2, 3), 0.5, shift=float("nan"))


def test_topk_t_below_one() -> None:
    with pytest.raises(ValueError, match=r"^t: expected 1 <= t <= K = 4, got 0"):
        topk_select(torch.zeros(2, 4), 0)


def test_topk_t_above_k() -> None:
    with pytest.raises(ValueError, match=r"^t: expected 1 <= t <= K = 4, got 5"):
        topk_select(torch.zeros(2, 4), 5)


def test_topk_rewards_not_2d() -> None:
    with pytest.raises(ValueError, match=r"^rewards: expected a \(B, K\) tensor, got .*\(8,\)"):
        topk_select(torch.zeros(8), 2)


def test_topk_integer_rewards() -> None:
    with pytest.raises(TypeError, match=r"^rewards: expected dtype"):
        topk_select(torch.zeros(2, 4, dtype=torch.int64), 2)


def test_cem_alpha_zero() -> None:
    with pytest.raises(ValueError, match=r"^alpha: expected 0 < alpha <= 1, got 0.0"):
        cem_update(0.0, 1.0, IDX, alpha=0.0, **CEM)


def test_cem_alpha_above_one() -> None:
    with pytest.raises(ValueError, match=r"^alpha: expected 0 < alpha <= 1, got 1.5"):
        cem_update(0.0, 1.0, IDX, alpha=1.5, **CEM)


def test_cem_alpha_nan() -> None:
    with pytest.raises(ValueError, match=r"^alpha: expected a finite number"):
        cem_update(0.0, 1.0, IDX, alpha=float("nan"), **CEM)


def test_cem_negative_min_sigma() -> None:
    with pytest.raises(ValueError, match=r"^min_sigma: expected a value >= 0, got -0.1"):
        cem_update(0.0, 1.0, IDX, min_sigma=-0.1, **CEM)


def test_cem_index_out_of_range() -> None:
    msg = r"^elite_idx: expected indices in \[0, 4\), got .*\[0, 4\]"
    with pytest.raises(ValueError, match=msg):
        cem_update(0.0, 1.0, torch.tensor([[0, 1], [2, 4]]), **CEM)


def test_cem_negative_index() -> None:
    with pytest.raises(ValueError, match=r"^elite_idx: expected indices in \[0, 4\), got .*\[-1,"):
        cem_update(0.0, 1.0, torch.tensor([[0, -1], [2, 3]]), **CEM)


def test_cem_repeated_index() -> None:
    msg = r"^elite_idx: expected distinct candidates per row, row 1"
    with pytest.raises(ValueError, match=msg):
        cem_update(0.0, 1.0, torch.tensor([[0, 1], [2, 2]]), **CEM)


def test_cem_more_elites_than_candidates() -> None:
    with pytest.raises(ValueError, match=r"^elite_idx: expected 1 <= T <= k = 4"):
        cem_update(0.0, 1.0, torch.tensor([[0, 1, 2, 3, 0]] * 2), **CEM)


def test_cem_index_rows_mismatch() -> None:
    with pytest.raises(ValueError, match=r"^elite_idx: expected shape \(2, T\)"):
        cem_update(0.0, 1.0, torch.tensor([[0, 1]]), **CEM)


def test_cem_index_float_dtype() -> None:
    with pytest.raises(TypeError, match=r"^elite_idx: expected dtype torch.int64"):
        cem_update(0.0, 1.0, IDX.float(), **CEM)


def test_cem_mu_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"^mu: .*broadcastable to \(2, 3, 4\)"):
        cem_update(torch.zeros(2, 4, 3), 1.0, IDX, **CEM)


def test_cem_pooled_needs_row_sigma() -> None:
    with pytest.raises(ValueError, match=r"^sigma: per_element=False pools"):
        cem_update(0.0, torch.ones(2, 3, 4), IDX, per_element=False, **CEM)


def test_cem_negative_sigma() -> None:
    with pytest.raises(ValueError, match=r"^sigma: expected a value >= 0"):
        cem_update(0.0, -1.0, IDX, **CEM)


def test_cem_k_below_one() -> None:
    with pytest.raises(ValueError, match=r"^k: expected an int >= 1, got 0"):
        cem_update(0.0, 1.0, IDX, **{**CEM, "k": 0})


def test_cem_bad_shape() -> None:
    with pytest.raises(ValueError, match=r"^shape: expected \(B, \*S\) with every dimension >= 1"):
        cem_update(0.0, 1.0, IDX, **{**CEM, "shape": (2, 0)})


def test_row_offset_negative() -> None:
    msg = r"^row_offset: expected 0 <= row_offset and row_offset \+ B <= 2\*\*32 .*got -1"
    with pytest.raises(ValueError, match=msg):
        sp(row_offset=-1)


def test_row_offset_past_the_row_word() -> None:
    with pytest.raises(ValueError, match=r"^row_offset: .*\(B = 2 rows.*got 4294967295"):
        sp(row_offset=2**32 - 1)


def test_row_offset_tensor_value_checked_unless_validate_false() -> None:
    with pytest.raises(ValueError, match=r"^row_offset: .*got tensor value -3"):
        sp(row_offset=torch.tensor(-3))
    sp(row_offset=torch.tensor(-3), validate=False)  # the value is not read


def test_row_offset_float() -> None:
    with pytest.raises(TypeError, match=r"^row_offset: expected an int or a 0-d int64 tensor"):
        sp(row_offset=1.0)


def test_cem_row_offset_past_the_row_word() -> None:
    with pytest.raises(ValueError, match=r"^row_offset: .*got tensor value 4294967295"):
        cem_update(0.0, 1.0, IDX, row_offset=torch.tensor(2**32 - 1), **CEM)


def test_cem_row_offset_int32_tensor() -> None:
    with pytest.raises(TypeError, match=r"^row_offset: .*dtype torch.int32"):
        cem_update(0.0, 1.0, IDX, row_offset=torch.tensor(1, dtype=torch.int32), **CEM)


def test_cem_counts_not_a_tensor() -> None:
    msg = r"^counts: expected None or a \(2,\) int64 tensor, got object of type list"
    with pytest.raises(TypeError, match=msg):
        cem_update(0.0, 1.0, IDX, counts=[1, 2], **CEM)


def test_cem_counts_int32() -> None:
    with pytest.raises(TypeError, match=r"^counts: expected dtype torch.int64, got .*int32"):
        cem_update(0.0, 1.0, IDX, counts=torch.tensor([1, 2], dtype=torch.int32), **CEM)


def test_cem_counts_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"^counts: expected shape \(2,\) .*got .*\(2, 1\)"):
        cem_update(0.0, 1.0, IDX, counts=torch.tensor([[1], [2]]), **CEM)


def test_cem_counts_on_another_device() -> None:
    with pytest.raises(ValueError, match=r"^counts: expected a tensor on cpu.*device meta"):
        cem_update(0.0, 1.0, IDX, counts=torch.tensor([1, 2], device="meta"), **CEM)


def test_cem_counts_above_t() -> None:
    with pytest.raises(ValueError, match=r"^counts: expected 0 <= counts <= T = 2 .*\[1, 3\]"):
        cem_update(0.0, 1.0, IDX, counts=torch.tensor([1, 3]), **CEM)


def test_cem_counts_negative() -> None:
    with pytest.raises(ValueError, match=r"^counts: expected 0 <= counts <= T = 2 .*\[-1, 2\]"):
        cem_update(0.0, 1.0, IDX, counts=torch.tensor([-1, 2]), **CEM)


def test_cem_used_index_out_of_range_with_counts() -> None:
    msg = r"^elite_idx: expected indices in \[0, 4\) \(the first counts\[b\] of each row\)"
    with pytest.raises(ValueError, match=msg):
        cem_update(0.0, 1.0, torch.tensor([[0, 9], [5, 3]]), counts=torch.tensor([2, 1]), **CEM)


def test_unknown_backend(monkeypatch) -> None:
    monkeypatch.setenv("SMARTGRPO_BACKEND", "cudnn")
    with pytest.raises(ValueError, match=r"^SMARTGRPO_BACKEND: expected one of .*got 'cudnn'"):
        sp()


def test_triton_backend_on_cpu_without_interpreter(monkeypatch) -> None:
    pytest.importorskip("triton")
    monkeypatch.setenv("SMARTGRPO_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"TRITON_INTERPRET=1"):
        resolve_backend(torch.device("cpu"))


@pytest.mark.parametrize(
    ("a", "b", "current", "same"),
    [
        ("cuda", "cuda:0", 0, True),  # a tensor made with device="cuda" is on cuda:0
        ("cuda:1", "cuda", 1, True),
        ("cuda", "cuda:0", 1, False),  # "cuda" is the current device, here cuda:1
        ("cuda:0", "cuda:1", 0, False),
        ("cpu", "cpu", 0, True),
        ("cpu", "cuda:0", 0, False),
        ("cpu", "meta", 0, False),
    ],
)
def test_same_device_resolves_an_index_free_cuda_device(monkeypatch, a, b, current, same) -> None:
    from smartgrpo_fast.devices import same_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    assert same_device(torch.device(a), torch.device(b)) is same
    assert same_device(torch.device(b), torch.device(a)) is same


def test_device_check_accepts_the_current_cuda_device_by_either_name(monkeypatch) -> None:
    """philox_normal(device="cuda", row_offset=<tensor on cuda:0>) raised before (seen on an
    H200): the check compared torch.device("cuda") with torch.device("cuda", 0)."""
    from smartgrpo_fast.ops import _common

    class OnCuda0(torch.Tensor):  # a CPU tensor that says it is on cuda:0
        device = property(lambda self: torch.device("cuda", 0))

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    offset = torch.tensor(3).as_subclass(OnCuda0)
    _common.check_same_device(torch.device("cuda"), row_offset=offset)
    with pytest.raises(ValueError, match=r"row_offset: expected a tensor on cuda:1"):
        _common.check_same_device(torch.device("cuda", 1), row_offset=offset)


def test_a_float_parameter_is_filled_on_the_device_not_copied(monkeypatch) -> None:
    """Param.values of a float: torch.full (a fill kernel), never torch.tensor(value,
    device=...) (a pageable host copy: it synchronises a CUDA stream and cannot be captured)."""
    from smartgrpo_fast.ops._common import Mode, Param

    def no_copy(*args, **kwargs):
        raise AssertionError("torch.tensor called: a host-to-device copy")

    monkeypatch.setattr(torch, "tensor", no_copy)
    v = Param(Mode.SCALAR, value=0.25).values(3, 5, torch.device("cpu"))
    assert v.dim() == 0 and v.dtype == torch.float32 and float(v) == 0.25
