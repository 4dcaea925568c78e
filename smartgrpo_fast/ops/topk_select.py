"""topk_select: indices of the T highest rewards per row, NaN-safe and stable.

Order: higher reward first; every NaN ranks below every number (-inf included); equal rewards
(``-0.0 == 0.0`` included) go to the lower index. Rewards are ranked in float32 (float64
rewards are ranked in float64 by the PyTorch path on every device).

The kernels map each reward to a 64-bit key that is unique and totally ordered: the high word
is the float's bits made monotonic (NaN lowest), the low word is ``2**32 - 1 - index``. The
Triton kernel takes T rounds of "the row maximum, then knock it out"; the C++ op (CPU,
``topk_select_out`` in ``csrc/ops_cpu.cpp``) a partial sort of the keys. There is no CUDA C++
version: under ``SMARTGRPO_BACKEND=cuda`` the Triton kernel runs. A (B, K) ranking is tiny work,
so what a call costs is host time: the C++ op is there because the reference's two sorts and
gathers cost about 22 us a call on CPU against 2 us for ``torch.topk`` (which has no stable
tie order), and ``validate=False`` skips the checks and the dispatch (:mod:`._fast`).
"""

from __future__ import annotations

import torch

from smartgrpo_fast.ops import _cpp
from smartgrpo_fast.ops._common import (
    FLOAT_DTYPES,
    alloc,
    check_float_tensor,
    describe,
    op_backend,
)
from smartgrpo_fast.ops._fast import MISSING, PlanCache, backend_env, direct
from smartgrpo_fast.ops._library import compiling, define_op, kernel, trace_triton
from smartgrpo_fast.ops._triton import next_power_of_2, tl, triton

__all__ = ["topk_select", "topk_select_reference"]

_MAX_K = 2**20
_BACKENDS = ("reference", "cpp", "triton")

if triton is not None:
    _INT32_MIN = tl.constexpr(-(2**31))
    _INT64_MIN = tl.constexpr(-(2**63))

    @triton.jit(do_not_specialize=["K", "T"])
    def _topk_select_kernel(idx_ptr, r_ptr, K, T, stride_r_b, stride_r_k, BLOCK_K: tl.constexpr):
        i_b = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_K)
        mask = offs < K
        low_mask = tl.full((), 2**32 - 1, tl.int64)
        b_r = tl.load(r_ptr + i_b * stride_r_b + offs * stride_r_k, mask=mask, other=0.0)
        b_f = b_r.to(tl.float32)
        b_bits = b_f.to(tl.int32, bitcast=True)
        b_bits = tl.where(b_bits == _INT32_MIN, 0, b_bits)  # -0.0 ranks as +0.0
        b_key = b_bits ^ ((b_bits >> 31) & 0x7FFFFFFF)  # monotonic signed order
        b_key = tl.where(b_f != b_f, _INT32_MIN, b_key)  # NaN below -inf
        b_comp = (b_key.to(tl.int64) << 32) | (low_mask - offs.to(tl.int64))
        b_comp = tl.where(mask, b_comp, _INT64_MIN)
        for i in range(T):
            m = tl.max(b_comp, axis=0)
            tl.store(idx_ptr + i_b * T + i, low_mask - (m & low_mask))
            b_comp = tl.where(b_comp == m, _INT64_MIN, b_comp)


def topk_select_reference(rewards: torch.Tensor, t: int) -> torch.Tensor:
    """Plain PyTorch topk_select: two stable sorts give (NaN last, value desc, index asc)."""
    r = rewards.to(torch.float64 if rewards.dtype == torch.float64 else torch.float32)
    nan = torch.isnan(r)
    r = torch.where(nan, torch.zeros_like(r), r) + 0.0  # + 0.0 turns -0.0 into +0.0
    order = torch.sort(r, dim=1, descending=True, stable=True).indices
    order = order.gather(
        1, torch.sort(nan.gather(1, order).to(torch.uint8), dim=1, stable=True).indices
    )
    return order[:, :t].contiguous()


def _topk_select(backend: str, rewards: torch.Tensor, t: int, wrap: bool = False) -> torch.Tensor:
    """(B, t) int64 indices of the best of (B, K) ``rewards`` on ``backend`` (arguments
    validated by the caller; ``wrap``: launch the Triton kernel through wrap_triton); float64
    rewards always run the reference."""
    batch, k = rewards.shape
    out = alloc((batch, t), torch.int64, rewards.device)
    if backend == "reference" or rewards.dtype == torch.float64:
        out.copy_(topk_select_reference(rewards, t))
        return out
    if backend == "cpp":
        _cpp.topk_select_out(out, rewards, t)
        return out
    block_k = max(16, next_power_of_2(k))
    kernel(_topk_select_kernel, wrap)[(batch,)](
        out,
        rewards,
        k,
        t,
        rewards.stride(0),
        rewards.stride(1),
        BLOCK_K=block_k,
        num_warps=4 if block_k <= 2048 else 8,
    )
    return out


def _topk_select_op(rewards: torch.Tensor, t: int) -> torch.Tensor:
    """``smartgrpo_fast::topk_select`` on the backend picked now (arguments validated by the
    caller)."""
    return _topk_select(op_backend(rewards.device, _BACKENDS), rewards, t)


def _topk_select_fake(rewards, t):
    return rewards.new_empty((rewards.shape[0], t), dtype=torch.int64)


define_op(
    "topk_select(Tensor rewards, SymInt t) -> Tensor",
    _topk_select_op,
    _topk_select_fake,
)


if triton is not None:

    @torch.library.triton_op("smartgrpo_fast::topk_select_triton", mutates_args=())
    def _topk_select_triton_op(rewards: torch.Tensor, t: int) -> torch.Tensor:
        """``smartgrpo_fast::topk_select_triton``: the Triton kernel (what torch.compile traces
        under the ``triton`` backend, float64 rewards excepted)."""
        return _topk_select("triton", rewards, t, wrap=True)


def topk_select(rewards: torch.Tensor, t: int, *, validate: bool = True) -> torch.Tensor:
    """Indices of the ``t`` best candidates of each row.

    Args:
        rewards: (B, K) float32/bfloat16/float16/float64 rewards, higher is better. NaN ranks
            last. Any strides.
        t: how many to keep, 1 <= t <= K.
        validate: check the arguments at every call. No value of ``rewards`` is ever read to
            check it (NaN is a rank, not an error), so ``False`` only skips the type and shape
            checks after the first call of a form (they run once, and raise as usual).

    Returns:
        (B, t) int64 indices into K, best first; ties go to the lower index.

    Calls ``torch.ops.smartgrpo_fast.topk_select`` (under ``torch.compile``, which skips the
    argument checks, ``topk_select_triton`` when the backend is ``triton``); an eager call with
    ``validate=False`` runs a cached plan instead (see :mod:`smartgrpo_fast.ops._fast`).
    """
    fast = not validate and isinstance(rewards, torch.Tensor) and t.__class__ is int
    if fast and not compiling():
        key = (backend_env(), rewards.shape, rewards.stride(), rewards.dtype, rewards.device, t)
        plan = _PLANS.lookup(key)
        if plan is MISSING:
            plan = _plan(rewards, t)
            _PLANS.put(key, plan)
        return plan(rewards, t)
    if not compiling():
        _validate(rewards, t)
    op = torch.ops.smartgrpo_fast.topk_select
    if compiling() and rewards.dtype != torch.float64 and trace_triton(rewards.device, _BACKENDS):
        op = torch.ops.smartgrpo_fast.topk_select_triton
    return op(rewards, t)


def _validate(rewards: object, t: object) -> None:
    """Check topk_select's arguments (see its docstring)."""
    check_float_tensor("rewards", rewards, dtypes=(*FLOAT_DTYPES, torch.float64))
    if rewards.dim() != 2:
        raise ValueError(f"rewards: expected a (B, K) tensor, got {describe(rewards)}")
    batch, k = rewards.shape
    if batch < 1 or k < 1:
        raise ValueError(f"rewards: expected B >= 1 and K >= 1, got {describe(rewards)}")
    if isinstance(t, bool) or not isinstance(t, int):
        raise TypeError(f"t: expected an int, got {describe(t)}")
    if not 1 <= t <= k:
        raise ValueError(f"t: expected 1 <= t <= K = {k}, got {t}")
    if k > _MAX_K:
        raise ValueError(f"rewards: expected K <= {_MAX_K} candidates per row, got {k}")


_PLANS = PlanCache()


def _plan(rewards: torch.Tensor, t: int):
    """The fast path's plan for this form of ``rewards`` and this ``t`` (validated here: a bad
    one raises): the C++ op called directly under ``cpp``, else the backend's function."""
    _validate(rewards, t)
    backend = op_backend(rewards.device, _BACKENDS)
    if backend != "cpp" or rewards.dtype == torch.float64:

        def generic(rewards: torch.Tensor, t: int) -> torch.Tensor:
            return _topk_select(backend, rewards, t)

        return generic

    op = direct(torch.ops.smartgrpo_fast.topk_select_out.default)
    out_shape, device = (rewards.shape[0], t), rewards.device

    def cpp(rewards: torch.Tensor, t: int) -> torch.Tensor:
        out = alloc(out_shape, torch.int64, device)
        op(out, rewards, t)
        return out

    return cpp
