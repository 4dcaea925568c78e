"""sample_perturb: draw K candidate noises per row and perturb the SDE mean with each, fused.

``z[b, j] = mean[b] + scale[b] * (mu[b] + sigma[b] * n[b, j])`` with ``n`` the Philox stream
of :mod:`smartgrpo_fast.ops.philox`. The kernel reads ``mean``, ``mu`` and ``sigma`` once per
block and writes the K candidates: the (B, K, *S) noise never exists in memory. The same op
exists in C++ for CPU tensors and in CUDA C++ (``smartgrpo_fast/csrc``, backends ``cpp`` and
``cuda``).
"""

from __future__ import annotations

import math

import torch

from smartgrpo_fast.ops import _cpp
from smartgrpo_fast.ops._common import (
    Param,
    alloc,
    check_float_tensor,
    check_no_grad,
    check_round,
    check_row_offset,
    check_seed,
    check_stream_limits,
    normalize_param,
    resolve_backend,
    rows_view,
)
from smartgrpo_fast.ops._fast import (
    MISSING,
    U32,
    U64,
    PlanCache,
    backend_env,
    direct,
    form,
    int_words,
    seed_words,
)
from smartgrpo_fast.ops._library import (
    compiling,
    define_op,
    int_arg,
    int_of,
    kernel,
    param_arg,
    param_of,
    seed_arg,
    seed_of,
    trace_triton,
)
from smartgrpo_fast.ops._triton import tl, triton
from smartgrpo_fast.ops.philox import (
    noise_block_size,
    normals_reference,
    seed_args,
    seed_values,
    stream_rows,
)

__all__ = ["sample_perturb", "sample_perturb_reference"]

_BACKENDS = ("reference", "cpp", "cuda", "triton")

if triton is not None:
    from smartgrpo_fast.ops.philox import (
        load_key,
        load_round,
        load_row_offset,
        philox_normal4,
        philox_normal_block,
    )

    @triton.jit
    def load_param(ptr, value, b, offs, mask, stride_b, stride_e, MODE: tl.constexpr):
        """float32 parameter block: a scalar value, one value per row, or one per element."""
        if MODE == 0:
            p = tl.cast(value, tl.float32)
        elif MODE == 1:
            p = tl.load(ptr + b * stride_b).to(tl.float32)
        else:
            p = tl.load(ptr + b * stride_b + offs * stride_e, mask=mask, other=0.0)
            p = p.to(tl.float32)
        return p

    @triton.jit(
        do_not_specialize=[
            "seed_lo", "seed_hi", "round_val", "row_offset_val", "K", "cands_per_prog"
        ]
    )  # fmt: skip
    def _sample_perturb_kernel(
        z_ptr,
        mean_ptr,
        mu_ptr,
        sigma_ptr,
        scale_ptr,
        seed_ptr,
        round_ptr,
        row_offset_ptr,
        mu_val,
        sigma_val,
        scale_val,
        seed_lo,
        seed_hi,
        round_val,
        row_offset_val,
        D,
        K,
        n_blocks,
        n_chunks,
        cands_per_prog,
        stride_mean_b,
        stride_mean_e,
        stride_mu_b,
        stride_mu_e,
        stride_sigma_b,
        stride_sigma_e,
        stride_scale_b,
        MU_MODE: tl.constexpr,
        SIGMA_MODE: tl.constexpr,
        SCALE_MODE: tl.constexpr,
        SEED_FROM_PTR: tl.constexpr,
        ROUND_FROM_PTR: tl.constexpr,
        ROW_OFFSET_FROM_PTR: tl.constexpr,
        BLOCK: tl.constexpr,
        TILE: tl.constexpr,
    ):
        # One program: one block of BLOCK elements of row b, for a chunk of candidates.
        pid = tl.program_id(0).to(tl.int64)
        i_blk = pid % n_blocks
        i_rest = pid // n_blocks
        i_chunk = i_rest % n_chunks
        i_b = i_rest // n_chunks

        k0, k1 = load_key(seed_ptr, seed_lo, seed_hi, SEED_FROM_PTR)
        rnd = load_round(round_ptr, round_val, ROUND_FROM_PTR)
        b_word = i_b + load_row_offset(row_offset_ptr, row_offset_val, ROW_OFFSET_FROM_PTR)
        j_start = i_chunk * cands_per_prog
        j_end = tl.minimum(j_start + cands_per_prog, K)
        if TILE:
            # The (G, 4) element tile: row g holds the four normals of Philox group g
            # (elements 4g .. 4g+3), stored through 2-D pointers: no join, reshape or
            # shared-memory shuffle (taken when 16 divides D, so that the masked stores
            # vectorise; otherwise the tile's stores would not, and the layouts would differ)
            GROUPS: tl.constexpr = BLOCK // 4
            g = (i_blk * GROUPS + tl.arange(0, GROUPS))[:, None]  # (G, 1): the tile's layout
            w = tl.arange(0, 4)[None, :]
            offs = 4 * g + w
        else:
            offs = i_blk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < D
        b_mean = tl.load(
            mean_ptr + i_b * stride_mean_b + offs * stride_mean_e, mask=mask, other=0.0
        ).to(tl.float32)
        b_mu = load_param(mu_ptr, mu_val, i_b, offs, mask, stride_mu_b, stride_mu_e, MU_MODE)
        b_sigma = load_param(
            sigma_ptr, sigma_val, i_b, offs, mask, stride_sigma_b, stride_sigma_e, SIGMA_MODE
        )
        b_scale = load_param(scale_ptr, scale_val, i_b, offs, mask, stride_scale_b, 0, SCALE_MODE)
        for j in range(j_start, j_end):
            if TILE:
                n0, n1, n2, n3 = philox_normal4(g, j, b_word, rnd, k0, k1)  # (G, 1) each
                b_n = tl.where(w == 0, n0, tl.where(w == 1, n1, tl.where(w == 2, n2, n3)))
            else:
                b_n = philox_normal_block(i_blk, j, b_word, rnd, k0, k1, BLOCK)
            b_z = b_mean + b_scale * (b_mu + b_sigma * b_n)
            p_z = z_ptr + (i_b * K + j) * D + offs
            tl.store(p_z, b_z.to(z_ptr.dtype.element_ty), mask=mask)


def _param_rows(p: Param, batch: int, numel: int, device: torch.device) -> torch.Tensor:
    """A Param as float32 broadcastable to (batch, 1, numel) (reference path)."""
    v = p.values(batch, numel, device)
    return v if v.dim() == 0 else v.unsqueeze(1)


def sample_perturb_reference(
    mean2: torch.Tensor,
    mu: Param,
    sigma: Param,
    scale: Param,
    *,
    k: int,
    seed: int,
    rnd: int,
    row_offset: int = 0,
) -> torch.Tensor:
    """Plain PyTorch sample_perturb on validated, normalised arguments.

    ``mean2`` is (B, D); returns float32 (B, k, D). Row b draws the stream's row
    ``b + row_offset``.
    """
    batch, numel = mean2.shape
    device = mean2.device
    rows = stream_rows(batch, row_offset, device).view(batch, 1)
    cands = torch.arange(k, device=device).view(1, k)
    n = normals_reference(seed, rnd, rows, cands, numel)
    mu_r = _param_rows(mu, batch, numel, device)
    sigma_r = _param_rows(sigma, batch, numel, device)
    scale_r = _param_rows(scale, batch, 1, device)
    return mean2.float().unsqueeze(1) + scale_r * (mu_r + sigma_r * n)


def _candidates_per_program(n_programs_without_chunks: int, k: int) -> int:
    """Candidates each program loops over: all of them unless that leaves the GPU idle."""
    target_programs = 1024  # a few waves on ~132 SMs
    if n_programs_without_chunks >= target_programs:
        return k
    chunks = min(k, math.ceil(target_programs / n_programs_without_chunks))
    return math.ceil(k / chunks)


def _ptr(p: Param, fallback: torch.Tensor) -> torch.Tensor:
    return p.tensor if p.tensor is not None else fallback


def _sample_perturb(
    backend: str,
    mean: torch.Tensor,
    p_mu: Param,
    p_sigma: Param,
    p_scale: Param,
    k: int,
    seed: int | torch.Tensor,
    rnd: int | torch.Tensor,
    row_offset: int | torch.Tensor,
    wrap: bool = False,
) -> torch.Tensor:
    """(B, k, *S) candidates of ``mean`` (B, *S) on ``backend`` (arguments validated by the
    caller; ``wrap``: launch the Triton kernel through wrap_triton)."""
    device = mean.device
    batch, inner = mean.shape[0], tuple(mean.shape[1:])
    numel = math.prod(inner)
    mean2, stride_mean_b, stride_mean_e = rows_view("mean", mean, batch, numel)
    if backend == "reference":
        s, r = seed_values(seed, rnd)
        z = sample_perturb_reference(
            mean2, p_mu, p_sigma, p_scale, k=k, seed=s, rnd=r, row_offset=row_offset
        )
        out = alloc((batch, k, *inner), mean.dtype, device)
        out.copy_(z.reshape(out.shape))
        return out

    out = alloc((batch, k, *inner), mean.dtype, device)
    if backend in ("cpp", "cuda"):
        _cpp.sample_perturb_out(out, mean2, p_mu, p_sigma, p_scale, seed, rnd, row_offset)
        return out
    block = noise_block_size(numel)
    n_blocks = triton.cdiv(numel, block)
    cands = _candidates_per_program(n_blocks * batch, k)
    n_chunks = triton.cdiv(k, cands)
    kernel(_sample_perturb_kernel, wrap)[(n_blocks * n_chunks * batch,)](
        out,
        mean2,
        _ptr(p_mu, mean2),
        _ptr(p_sigma, mean2),
        _ptr(p_scale, mean2),
        mu_val=p_mu.value,
        sigma_val=p_sigma.value,
        scale_val=p_scale.value,
        D=numel,
        K=k,
        n_blocks=n_blocks,
        n_chunks=n_chunks,
        cands_per_prog=cands,
        stride_mean_b=stride_mean_b,
        stride_mean_e=stride_mean_e,
        stride_mu_b=p_mu.stride_b,
        stride_mu_e=p_mu.stride_e,
        stride_sigma_b=p_sigma.stride_b,
        stride_sigma_e=p_sigma.stride_e,
        stride_scale_b=p_scale.stride_b,
        MU_MODE=int(p_mu.mode),
        SIGMA_MODE=int(p_sigma.mode),
        SCALE_MODE=int(p_scale.mode),
        BLOCK=block,
        TILE=numel % 16 == 0,
        **seed_args(seed, rnd, device, row_offset, traced=wrap),
    )
    return out


def _sample_perturb_op(
    mean: torch.Tensor,
    mu: torch.Tensor | None,
    mu_val: float,
    sigma: torch.Tensor | None,
    sigma_val: float,
    scale: torch.Tensor | None,
    scale_val: float,
    k: int,
    seed_t: torch.Tensor | None,
    seed_lo: int,
    seed_hi: int,
    round_t: torch.Tensor | None,
    round: int,
    row_offset_t: torch.Tensor | None,
    row_offset: int,
) -> torch.Tensor:
    """``smartgrpo_fast::sample_perturb`` on the backend :func:`resolve_backend` picks now (see
    :mod:`smartgrpo_fast.ops._library` for the argument forms)."""
    return _sample_perturb(
        resolve_backend(mean.device),
        mean,
        param_of(mu, mu_val),
        param_of(sigma, sigma_val),
        param_of(scale, scale_val),
        k,
        seed_of(seed_t, seed_lo, seed_hi),
        int_of(round_t, round),
        int_of(row_offset_t, row_offset),
    )


def _sample_perturb_fake(
    mean, mu, mu_val, sigma, sigma_val, scale, scale_val, k, seed_t, seed_lo, seed_hi, round_t,
    round, row_offset_t, row_offset,
):  # fmt: skip
    return mean.new_empty((mean.shape[0], k, *mean.shape[1:]))


define_op(
    (
        "sample_perturb(Tensor mean, Tensor? mu, float mu_val, Tensor? sigma, float sigma_val, "
        "Tensor? scale, float scale_val, SymInt k, "
        "Tensor? seed_t, SymInt seed_lo, SymInt seed_hi, Tensor? round_t, SymInt round, "
        "Tensor? row_offset_t, SymInt row_offset) -> Tensor"
    ),
    _sample_perturb_op,
    _sample_perturb_fake,
)


if triton is not None:

    @torch.library.triton_op("smartgrpo_fast::sample_perturb_triton", mutates_args=())
    def _sample_perturb_triton_op(
        mean: torch.Tensor,
        mu: torch.Tensor | None,
        mu_val: float,
        sigma: torch.Tensor | None,
        sigma_val: float,
        scale: torch.Tensor | None,
        scale_val: float,
        k: int,
        seed_t: torch.Tensor | None,
        seed_lo: int,
        seed_hi: int,
        round_t: torch.Tensor | None,
        round: int,
        row_offset_t: torch.Tensor | None,
        row_offset: int,
    ) -> torch.Tensor:
        """``smartgrpo_fast::sample_perturb_triton``: the Triton kernel (what torch.compile
        traces under the ``triton`` backend)."""
        return _sample_perturb(
            "triton",
            mean,
            param_of(mu, mu_val),
            param_of(sigma, sigma_val),
            param_of(scale, scale_val),
            k,
            seed_of(seed_t, seed_lo, seed_hi),
            int_of(round_t, round),
            int_of(row_offset_t, row_offset),
            wrap=True,
        )


def sample_perturb(
    mean: torch.Tensor,
    mu: float | torch.Tensor,
    sigma: float | torch.Tensor,
    scale: float | torch.Tensor,
    *,
    k: int,
    seed: int | torch.Tensor,
    round: int | torch.Tensor = 0,
    validate: bool = True,
    row_offset: int | torch.Tensor = 0,
) -> torch.Tensor:
    """K perturbed candidates per row: ``z[b, j] = mean[b] + scale[b]*(mu[b] + sigma[b]*n[b, j])``.

    Args:
        mean: (B, *S) float32/bfloat16/float16, the SDE step's mean. Any strides.
        mu: the noise mean: a float, a 0-d or (B,) tensor (per row), or a tensor broadcastable
            to (B, *S) (per element). Any float dtype; read as float32.
        sigma: the noise std, same forms as ``mu``; must be >= 0.
        scale: the SDE step's std_t * sqrt(-dt): a float, or a 0-d or (B,) tensor.
        k: candidates per row, >= 1.
        seed: int in [0, 2**64) or 0-d int64 tensor on mean's device (read inside the kernel,
            so an in-place change is seen by a captured CUDA graph).
        round: int in [0, 2**32) or 0-d int64 tensor, likewise.
        validate: also check tensor *values* (finite mu/scale, finite non-negative sigma, round
            and row_offset range). This reads them and synchronises a CUDA stream; skipped
            during graph capture.
        row_offset: int or 0-d int64 tensor (read inside the kernel, like ``round``), ``>= 0``
            with ``row_offset + B <= 2**32``: row b draws the stream's row ``b + row_offset``,
            so a call on rows ``[o, o + B)`` of a larger batch with ``row_offset=o`` draws the
            noise those rows draw in the call on the whole batch.

    Returns:
        z: (B, k, *S) in mean's dtype, computed in float32. ``n`` is
        ``philox_normal((B, k, *S), seed=seed, round=round, row_offset=row_offset)``.

    Calls ``torch.ops.smartgrpo_fast.sample_perturb`` (under ``torch.compile``, which skips the
    argument checks, ``sample_perturb_triton`` when the backend is ``triton``); an eager call
    with ``validate=False`` runs a cached plan instead (see :mod:`smartgrpo_fast.ops._fast`).
    """
    if not validate and not compiling():
        try:  # a malformed argument (no tensor, unhashable) takes the checks below
            T = torch.Tensor  # the forms of the plan key, inline: see ops._fast.form
            key = (
                backend_env(), torch.is_grad_enabled(), k, k.__class__,
                mean.shape, mean.stride(), mean.dtype, mean.device, mean.requires_grad,
                (mu.shape, mu.stride(), mu.dtype, mu.device, mu.requires_grad)
                if isinstance(mu, T) else mu.__class__,
                (sigma.shape, sigma.stride(), sigma.dtype, sigma.device, sigma.requires_grad)
                if isinstance(sigma, T) else sigma.__class__,
                (scale.shape, scale.stride(), scale.dtype, scale.device, scale.requires_grad)
                if isinstance(scale, T) else scale.__class__,
                int if seed.__class__ is int else form(seed),
                int if round.__class__ is int else form(round),
                int if row_offset.__class__ is int else form(row_offset),
            )  # fmt: skip
            plan = _PLANS.lookup(key)
        except (AttributeError, TypeError):
            plan = None
        if plan is MISSING:
            plan = _plan(mean, mu, sigma, scale, k, seed, round, row_offset)
            _PLANS.put(key, plan)
        if plan is not None:
            out = plan(mean, mu, sigma, scale, seed, round, row_offset)
            if out is not None:
                return out
    if not compiling():
        seed, round, row_offset = _validate(
            mean, mu, sigma, scale, k, seed, round, row_offset, validate
        )
    batch, inner = mean.shape[0], tuple(mean.shape[1:])
    op = torch.ops.smartgrpo_fast.sample_perturb
    if compiling() and trace_triton(mean.device, _BACKENDS):
        op = torch.ops.smartgrpo_fast.sample_perturb_triton
    return op(
        mean,
        *param_arg(mu, batch, inner),
        *param_arg(sigma, batch, inner),
        *param_arg(scale, batch, (1,)),
        k,
        *seed_arg(seed),
        *int_arg(round),
        *int_arg(row_offset),
    )


def _validate(
    mean: object,
    mu: object,
    sigma: object,
    scale: object,
    k: object,
    seed: object,
    rnd: object,
    row_offset: object,
    validate: bool,
) -> tuple[int | torch.Tensor, int | torch.Tensor, int | torch.Tensor]:
    """Check sample_perturb's arguments (see its docstring); the validated seed, round and
    row offset."""
    check_float_tensor("mean", mean, min_dim=1)
    device = mean.device
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k: expected an int >= 1, got {type(k).__name__} {k!r}")
    if k < 1:
        raise ValueError(f"k: expected an int >= 1, got {k}")
    check_no_grad("sample_perturb", mean=mean, mu=mu, sigma=sigma, scale=scale)
    batch, inner = mean.shape[0], tuple(mean.shape[1:])
    numel = math.prod(inner)
    if batch < 1 or numel < 1:
        raise ValueError(
            f"mean: expected a non-empty (B, *S) tensor, got shape {tuple(mean.shape)}"
        )
    check_stream_limits(batch, k, numel)
    kw = {"batch": batch, "inner": inner, "device": device, "validate": validate}
    normalize_param("mu", mu, **kw)
    normalize_param("sigma", sigma, nonnegative=True, **kw)
    normalize_param("scale", scale, allow_elem=False, **kw)
    seed = check_seed(seed, device)
    rnd = check_round(rnd, device, validate=validate)
    row_offset = check_row_offset(row_offset, batch, device, validate=validate)
    return seed, rnd, row_offset


_PLANS = PlanCache()


def _plan(mean, mu, sigma, scale, k, seed, rnd, row_offset):
    """The fast path's plan for the forms of these arguments (validated here: a bad one
    raises). The plan returns z, or None when a value no key holds is out of range (then the
    slow path raises the usual error)."""
    _validate(mean, mu, sigma, scale, k, seed, rnd, row_offset, False)
    backend = resolve_backend(mean.device)
    batch, inner = mean.shape[0], tuple(mean.shape[1:])
    numel = math.prod(inner)
    out_shape, dtype, device = (batch, k, *inner), mean.dtype, mean.device
    mu_num, sigma_num, scale_num = (not isinstance(x, torch.Tensor) for x in (mu, sigma, scale))
    seed_int, rnd_int, offset_int = (
        not isinstance(x, torch.Tensor) for x in (seed, rnd, row_offset)
    )
    offset_end = U32 - batch + 1  # row_offset + B <= 2**32

    def ok(mu, sigma, scale, seed, rnd, row_offset) -> bool:
        return (
            (not mu_num or math.isfinite(mu))
            and (not sigma_num or (math.isfinite(sigma) and sigma >= 0))
            and (not scale_num or math.isfinite(scale))
            and (not seed_int or 0 <= seed < U64)
            and (not rnd_int or 0 <= rnd < U32)
            and (not offset_int or 0 <= row_offset < offset_end)
        )

    if backend != "cpp":

        def generic(mean, mu, sigma, scale, seed, rnd, row_offset):
            if not ok(mu, sigma, scale, seed, rnd, row_offset):
                return None
            return _sample_perturb(
                backend,
                mean,
                param_of(*param_arg(mu, batch, inner)),
                param_of(*param_arg(sigma, batch, inner)),
                param_of(*param_arg(scale, batch, (1,))),
                k,
                seed,
                rnd,
                row_offset,
            )

        return generic

    op = direct(torch.ops.smartgrpo_fast.sample_perturb_out.default)
    packed = direct(torch.ops.smartgrpo_fast.sample_perturb_out.packed)  # int seeds: 7 arguments
    conv_mu = _cpp_param(mu, batch, inner)
    conv_sigma = _cpp_param(sigma, batch, inner)
    conv_scale = _cpp_param(scale, batch, (1,))
    conv_mean = _same if mean.dim() >= 2 else (lambda m: m.reshape(batch, numel))
    isfinite = math.isfinite
    if not (seed_int and rnd_int and offset_int):  # a seed, round or offset tensor: general

        def cpp_general(mean, mu, sigma, scale, seed, rnd, row_offset):
            if not ok(mu, sigma, scale, seed, rnd, row_offset):
                return None
            out = alloc(out_shape, dtype, device)
            op(
                out,
                conv_mean(mean),
                *((None, float(mu)) if mu_num else (conv_mu(mu), 0.0)),
                *((None, float(sigma)) if sigma_num else (conv_sigma(sigma), 0.0)),
                *((None, float(scale)) if scale_num else (conv_scale(scale), 0.0)),
                *seed_words(seed),
                *int_words(rnd),
                *int_words(row_offset),
            )
            return out

        return cpp_general

    def cpp(mean, mu, sigma, scale, seed, rnd, row_offset):
        # int seed, round and row offset: the hot loop's case, every check inline
        if (
            (mu_num and not isfinite(mu))
            or (sigma_num and not (isfinite(sigma) and sigma >= 0))
            or (scale_num and not isfinite(scale))
            or not (0 <= seed < U64 and 0 <= rnd < U32 and 0 <= row_offset < offset_end)
        ):
            return None
        out = alloc(out_shape, dtype, device)
        packed(
            out,
            conv_mean(mean),
            None if mu_num else conv_mu(mu),
            None if sigma_num else conv_sigma(sigma),
            None if scale_num else conv_scale(scale),
            [mu if mu_num else 0.0, sigma if sigma_num else 0.0, scale if scale_num else 0.0],
            [seed & 0xFFFFFFFF, seed >> 32, rnd, row_offset],
        )
        return out

    return cpp


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


def _cpp_param(x: object, batch: int, inner: tuple[int, ...]):
    """How the C++ ops get a float-or-tensor parameter of this form: the tensor itself for a
    (B,) or a (B, *S) one (with len(S) >= 1), else the view :func:`param_arg` makes."""
    if not isinstance(x, torch.Tensor):
        return None
    if (x.dim() == 1 and x.shape[0] == batch) or (
        x.dim() >= 2 and tuple(x.shape) == (batch, *inner)
    ):
        return _same
    return lambda t: param_arg(t, batch, inner)[0]
