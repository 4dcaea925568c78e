"""cem_update: refine the CEM Gaussian from the elites, regenerating their noise from Philox.

For row b with elites ``E = elite_idx[b]`` (T of the K candidates that ``sample_perturb``
drew with the same seed and round), ``eps_j = mu + sigma * n[b, j]`` and

* ``mu_new = (1 - alpha) mu + alpha mean_{j in E} eps_j``
* ``sigma_new = max(min_sigma, (1 - alpha) sigma + alpha std_{j in E} eps_j)``, population std,
  per element; or with ``per_element=False`` one value per row, the pooled std
  ``sqrt(mean over elements of the per-element elite variance)``.

With ``counts``, row b uses only the first ``counts[b]`` elites (a row with none keeps mu and
sigma). Only the elite noises are regenerated, in registers: no (B, K, *S) buffer is ever read
or allocated. An elite index outside [0, K) (possible only with ``validate=False``) turns that
row's outputs into NaN instead of reading noise that was never drawn. The same op exists in
C++ for CPU tensors and in CUDA C++ (``smartgrpo_fast/csrc``, backends ``cpp`` and ``cuda``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from smartgrpo_fast.ops import _cpp
from smartgrpo_fast.ops._common import (
    Mode,
    Param,
    alloc,
    check_finite_values,
    check_no_grad,
    check_round,
    check_row_offset,
    check_same_device,
    check_seed,
    check_shape,
    check_stream_limits,
    describe,
    is_capturing,
    normalize_param,
    resolve_backend,
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
from smartgrpo_fast.ops._triton import block_size, tl, triton
from smartgrpo_fast.ops.philox import normals_reference, seed_args, seed_values, stream_rows

__all__ = ["cem_update", "cem_update_reference"]

_BACKENDS = ("reference", "cpp", "cuda", "triton")

if triton is not None:
    from smartgrpo_fast.ops.philox import (
        load_key,
        load_round,
        load_row_offset,
        philox_normal4,
        quad_tile,
    )

    @triton.jit
    def _load_param_tile(ptr, value, b, offs, mask, stride_b, stride_e, MODE: tl.constexpr):
        """A float32 parameter on the (G, 4) element tile ``offs``: scalar, per row or per
        element."""
        if MODE == 0:
            p = tl.zeros(offs.shape, dtype=tl.float32) + tl.cast(value, tl.float32)
        elif MODE == 1:
            p = tl.zeros(offs.shape, dtype=tl.float32) + tl.load(ptr + b * stride_b).to(tl.float32)
        else:
            p = tl.load(ptr + b * stride_b + offs * stride_e, mask=mask, other=0.0).to(tl.float32)
        return p

    @triton.jit
    def _accumulate(s1, s2, d):
        """(s1 + sum of d over its elites axis, s2 + sum of d^2): the (E, G) tile d."""
        return s1 + tl.sum(d, axis=0), s2 + tl.sum(d * d, axis=0)

    @triton.jit(do_not_specialize=["seed_lo", "seed_hi", "round_val", "row_offset_val", "K", "T"])
    def _cem_update_kernel(
        mu_out_ptr,
        sigma_out_ptr,
        var_part_ptr,
        mu_ptr,
        sigma_ptr,
        idx_ptr,
        counts_ptr,
        seed_ptr,
        round_ptr,
        row_offset_ptr,
        mu_val,
        sigma_val,
        seed_lo,
        seed_hi,
        round_val,
        row_offset_val,
        alpha,
        min_sigma,
        D,
        K,
        T,
        row0,
        stride_mu_b,
        stride_mu_e,
        stride_sigma_b,
        stride_sigma_e,
        stride_idx_b,
        stride_idx_t,
        stride_counts,
        MU_MODE: tl.constexpr,
        SIGMA_MODE: tl.constexpr,
        PER_ELEMENT: tl.constexpr,
        HAS_COUNTS: tl.constexpr,
        SEED_FROM_PTR: tl.constexpr,
        ROUND_FROM_PTR: tl.constexpr,
        ROW_OFFSET_FROM_PTR: tl.constexpr,
        BLOCK: tl.constexpr,
        ELITES: tl.constexpr,
    ):
        # Grid (element block, row): one program, BLOCK elements of row b, every elite.
        GROUPS: tl.constexpr = BLOCK // 4
        i_blk = tl.program_id(0).to(tl.int64)
        i_b = tl.program_id(1).to(tl.int64) + row0
        n_blocks = tl.num_programs(0)
        k0, k1 = load_key(seed_ptr, seed_lo, seed_hi, SEED_FROM_PTR)
        rnd = load_round(round_ptr, round_val, ROUND_FROM_PTR)
        b_word = i_b + load_row_offset(row_offset_ptr, row_offset_val, ROW_OFFSET_FROM_PTR)

        # The elites used: the first counts[b] (a count outside [0, T] marks the row bad).
        if HAS_COUNTS:
            c = tl.load(counts_ptr + i_b * stride_counts).to(tl.int64)
            n_bad = ((c < 0) | (c > T)).to(tl.int32)
            n_used = tl.minimum(tl.maximum(c, 0), T).to(tl.int32)
        else:
            n_bad = tl.program_id(0) * 0
            n_used = T

        # Sums over the used elites of d = n - c and d^2, per element, with n the standard
        # normals and c the first elite's (a shift that keeps S2 - S1^2 / T free of
        # cancellation); eps = mu + sigma n is formed once at the end. After the first elite,
        # ELITES elites a step: ELITES x GROUPS independent Philox chains, their indices loaded
        # one step ahead (no dependent load); full steps unmasked, then the last partial one.
        g1 = i_blk * GROUPS + tl.arange(0, GROUPS)  # (G,) Philox groups
        g = g1[None, :]
        p_idx = idx_ptr + i_b * stride_idx_b
        j0 = tl.load(p_idx, mask=n_used > 0, other=0).to(tl.int64)
        n_bad += ((n_used > 0) & ((j0 < 0) | (j0 >= K))).to(tl.int32)
        c_0, c_1, c_2, c_3 = philox_normal4(g1, j0, b_word, rnd, k0, k1)
        e_offs = 1 + tl.arange(0, ELITES)  # elites 1, 2, ... of the row
        j_next = tl.load(p_idx + e_offs * stride_idx_t, mask=e_offs < n_used, other=0)
        zero = tl.zeros([GROUPS], dtype=tl.float32)
        s1_0, s1_1, s1_2, s1_3 = zero, zero, zero, zero
        s2_0, s2_1, s2_2, s2_3 = zero, zero, zero, zero
        n_rest = tl.maximum(n_used - 1, 0)
        n_full = (n_rest // ELITES) * ELITES
        for i0 in range(0, n_full, ELITES):
            j = j_next.to(tl.int64)
            nxt = i0 + ELITES + e_offs
            j_next = tl.load(p_idx + nxt * stride_idx_t, mask=nxt < n_used, other=0)
            n_bad += tl.sum(((j < 0) | (j >= K)).to(tl.int32), axis=0)
            n0, n1, n2, n3 = philox_normal4(g, j[:, None], b_word, rnd, k0, k1)
            s1_0, s2_0 = _accumulate(s1_0, s2_0, n0 - c_0[None, :])
            s1_1, s2_1 = _accumulate(s1_1, s2_1, n1 - c_1[None, :])
            s1_2, s2_2 = _accumulate(s1_2, s2_2, n2 - c_2[None, :])
            s1_3, s2_3 = _accumulate(s1_3, s2_3, n3 - c_3[None, :])
        if n_full < n_rest:
            j = j_next.to(tl.int64)
            used = (n_full + e_offs) < n_used
            n_bad += tl.sum((used & ((j < 0) | (j >= K))).to(tl.int32), axis=0)
            n0, n1, n2, n3 = philox_normal4(g, j[:, None], b_word, rnd, k0, k1)
            w = used[:, None]
            s1_0, s2_0 = _accumulate(s1_0, s2_0, tl.where(w, n0 - c_0[None, :], 0.0))
            s1_1, s2_1 = _accumulate(s1_1, s2_1, tl.where(w, n1 - c_1[None, :], 0.0))
            s1_2, s2_2 = _accumulate(s1_2, s2_2, tl.where(w, n2 - c_2[None, :], 0.0))
            s1_3, s2_3 = _accumulate(s1_3, s2_3, tl.where(w, n3 - c_3[None, :], 0.0))

        # The (G, 4) element tile: element 4 g + w, from here on in registers.
        offs = (i_blk * BLOCK + 4 * tl.arange(0, GROUPS))[:, None] + tl.arange(0, 4)[None, :]
        mask = offs < D
        s1 = quad_tile(s1_0, s1_1, s1_2, s1_3)
        s2 = quad_tile(s2_0, s2_1, s2_2, s2_3)
        t_f = tl.cast(tl.maximum(n_used, 1), tl.float32)  # a row of no elite: no 0 / 0
        mean_n = quad_tile(c_0, c_1, c_2, c_3) + s1 / t_f
        # population variance of n: (S2 - S1^2 / T) / T (shift-invariant), 0 for one elite
        var_n = tl.maximum((s2 - (s1 * s1) / t_f) / t_f, 0.0)
        b_mu = _load_param_tile(mu_ptr, mu_val, i_b, offs, mask, stride_mu_b, stride_mu_e, MU_MODE)
        b_sigma = _load_param_tile(
            sigma_ptr, sigma_val, i_b, offs, mask, stride_sigma_b, stride_sigma_e, SIGMA_MODE
        )
        a = tl.cast(alpha, tl.float32)
        b_mu_new = (1.0 - a) * b_mu + a * (b_mu + b_sigma * mean_n)
        if HAS_COUNTS:
            b_mu_new = tl.where(n_used == 0, b_mu, b_mu_new)  # no elite: mu unchanged
        b_mu_new = tl.where(n_bad > 0, float("nan"), b_mu_new)
        tl.store(mu_out_ptr + i_b * D + offs, b_mu_new, mask=mask)
        if PER_ELEMENT:
            b_sigma_new = (1.0 - a) * b_sigma + a * (b_sigma * tl.sqrt_rn(var_n))
            b_sigma_new = tl.maximum(
                b_sigma_new, tl.cast(min_sigma, tl.float32), propagate_nan=tl.PropagateNan.ALL
            )
            if HAS_COUNTS:
                b_sigma_new = tl.where(n_used == 0, b_sigma, b_sigma_new)  # unchanged, no floor
            b_sigma_new = tl.where(n_bad > 0, float("nan"), b_sigma_new)
            tl.store(sigma_out_ptr + i_b * D + offs, b_sigma_new, mask=mask)
        else:
            # pooled: this block's sum of var(n); sigma is one value per row, applied by
            # _cem_pool_kernel, which adds the blocks' sums in a fixed order
            part = tl.sum(tl.sum(tl.where(mask, var_n, 0.0), axis=1), axis=0)
            part = tl.where(n_bad > 0, float("nan"), part)
            tl.store(var_part_ptr + i_b * n_blocks + i_blk, part)

    @triton.jit
    def _cem_pool_kernel(
        sigma_out_ptr,
        var_part_ptr,
        sigma_ptr,
        counts_ptr,
        sigma_val,
        alpha,
        min_sigma,
        D,
        n_blocks,
        row0,
        stride_sigma_b,
        stride_counts,
        SIGMA_MODE: tl.constexpr,
        HAS_COUNTS: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        """sigma_new of one row from its blocks' sums of var(n): the sums added in a fixed
        order (chunks of BLOCK_P in turn), so the result is deterministic."""
        i_b = tl.program_id(0).to(tl.int64) + row0
        acc = tl.zeros([BLOCK_P], dtype=tl.float32)
        for start in range(0, n_blocks, BLOCK_P):
            offs = start + tl.arange(0, BLOCK_P)
            acc += tl.load(var_part_ptr + i_b * n_blocks + offs, mask=offs < n_blocks, other=0.0)
        var_n = tl.sum(acc, axis=0) / tl.cast(D, tl.float32)
        if SIGMA_MODE == 0:
            sigma = tl.cast(sigma_val, tl.float32)
        else:
            sigma = tl.load(sigma_ptr + i_b * stride_sigma_b).to(tl.float32)
        a = tl.cast(alpha, tl.float32)
        s = (1.0 - a) * sigma + a * (sigma * tl.sqrt_rn(var_n))
        s = tl.maximum(s, tl.cast(min_sigma, tl.float32), propagate_nan=tl.PropagateNan.ALL)
        if HAS_COUNTS:
            c = tl.load(counts_ptr + i_b * stride_counts)
            s = tl.where(c == 0, sigma, s)  # no elite: unchanged
        tl.store(sigma_out_ptr + i_b, s)


def _over_elites(x: torch.Tensor) -> torch.Tensor:
    """(B, D) -> (B, 1, D) so it broadcasts against the (B, T, D) elite noise; 0-d stays."""
    return x if x.dim() == 0 else x.unsqueeze(1)


def cem_update_reference(
    mu: Param,
    sigma: Param,
    elite_idx: torch.Tensor,
    *,
    batch: int,
    numel: int,
    k: int,
    seed: int,
    rnd: int,
    alpha: float,
    min_sigma: float,
    per_element: bool,
    row_offset: int = 0,
    counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch cem_update: materialises the (B, T, D) elite noise. Returns float32
    mu_new (B, D) and sigma_new (B, D), or (B,) when pooled. Row b's elites are candidates of
    the stream's row ``b + row_offset``; with ``counts`` (B,) only the first ``counts[b]`` of
    them are used, and a row with none keeps its mu and sigma."""
    device = elite_idx.device
    t = elite_idx.shape[1]
    rows = stream_rows(batch, row_offset, device).view(batch, 1)
    n = normals_reference(seed, rnd, rows, elite_idx, numel)  # (B, T, D)
    mu_r = mu.values(batch, numel, device)
    sigma_r = sigma.values(batch, numel, device)
    eps = _over_elites(mu_r) + _over_elites(sigma_r) * n
    used = torch.ones(batch, t, dtype=torch.bool, device=device)
    if counts is None:
        mean = eps.mean(dim=1)
        var = eps.var(dim=1, unbiased=False)
    else:
        n_used = counts.to(torch.int64).clamp(0, t)
        used = torch.arange(t, device=device).view(1, t) < n_used.view(batch, 1)  # (B, T)
        w = used.unsqueeze(-1)
        n_used_f = n_used.clamp_min(1).to(torch.float32).view(batch, 1)  # rows of 0: kept
        mean = torch.where(w, eps, 0.0).sum(dim=1) / n_used_f
        var = torch.where(w, (eps - mean.unsqueeze(1)).square(), 0.0).sum(dim=1) / n_used_f
    mu_new = (1.0 - alpha) * mu_r + alpha * mean
    mu_new = mu_new.expand(batch, numel).clone()
    floor = torch.full((), min_sigma, dtype=torch.float32, device=device)  # no copy: capturable
    if per_element:
        sigma_new = torch.maximum((1.0 - alpha) * sigma_r + alpha * var.sqrt(), floor)
        sigma_new = sigma_new.expand(batch, numel).clone()
        sigma_old = sigma_r.expand(batch, numel)
    else:
        sigma_row = sigma_r[:, 0] if sigma_r.dim() else sigma_r.expand(batch)
        sigma_new = torch.maximum((1.0 - alpha) * sigma_row + alpha * var.mean(-1).sqrt(), floor)
        sigma_old = sigma_row
    bad = ((elite_idx < 0) | (elite_idx >= k)).logical_and(used).any(dim=1)
    if counts is not None:
        keep = counts == 0  # no elite: mu and sigma unchanged, no floor
        mu_new[keep] = mu_r.expand(batch, numel)[keep]
        sigma_new[keep] = sigma_old[keep]
        bad |= (counts < 0) | (counts > t)
    if bool(bad.any()):
        mu_new[bad] = float("nan")
        sigma_new[bad] = float("nan")
    return mu_new, sigma_new


def _check_counts(
    counts: object, batch: int, t: int, device: torch.device, validate: bool
) -> torch.Tensor | None:
    """None, or a (B,) int64 tensor on ``device`` with values in [0, T] (values checked when
    ``validate`` and not capturing)."""
    if counts is None:
        return None
    if not isinstance(counts, torch.Tensor):
        raise TypeError(
            f"counts: expected None or a ({batch},) int64 tensor, got {describe(counts)}"
        )
    if counts.dtype != torch.int64:
        raise TypeError(f"counts: expected dtype torch.int64, got {describe(counts)}")
    if tuple(counts.shape) != (batch,):
        raise ValueError(
            f"counts: expected shape ({batch},) (B from shape), got {describe(counts)}"
        )
    check_same_device(device, counts=counts)
    if validate and not is_capturing(counts.device):
        lo, hi = int(counts.min()), int(counts.max())
        if lo < 0 or hi > t:
            raise ValueError(
                f"counts: expected 0 <= counts <= T = {t} (elites per row), got values in "
                f"[{lo}, {hi}] in {describe(counts)}"
            )
    return counts


def _check_elite_idx(
    elite_idx: object, batch: int, k: int, validate: bool, counts: object = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The validated elite indices and counts. With counts, the index values are checked (in
    range, distinct) only where they are used: the first counts[b] of row b."""
    if not isinstance(elite_idx, torch.Tensor):
        raise TypeError(f"elite_idx: expected a (B, T) int64 tensor, got {describe(elite_idx)}")
    if elite_idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            f"elite_idx: expected dtype torch.int64 or int32, got {describe(elite_idx)}"
        )
    if elite_idx.dim() != 2 or elite_idx.shape[0] != batch:
        raise ValueError(
            f"elite_idx: expected shape ({batch}, T) (B from shape), got {describe(elite_idx)}"
        )
    t = elite_idx.shape[1]
    if not 1 <= t <= k:
        raise ValueError(f"elite_idx: expected 1 <= T <= k = {k} elites, got {describe(elite_idx)}")
    counts = _check_counts(counts, batch, t, elite_idx.device, validate)
    if validate and not is_capturing(elite_idx.device):
        idx = elite_idx.long()
        if counts is not None:  # unused entries: distinct values >= k, never out of range
            used = torch.arange(t, device=idx.device).view(1, t) < counts.view(batch, 1)
            idx = torch.where(used, idx, k + torch.arange(t, device=idx.device).view(1, t))
            values = elite_idx[used]
        else:
            values = elite_idx
        if values.numel() > 0:
            lo, hi = int(values.min()), int(values.max())
            if lo < 0 or hi >= k:
                used_note = " (the first counts[b] of each row)" if counts is not None else ""
                raise ValueError(
                    f"elite_idx: expected indices in [0, {k}){used_note}, got values in "
                    f"[{lo}, {hi}] in {describe(elite_idx)}"
                )
        srt = torch.sort(idx, dim=1).values
        dup = (srt[:, 1:] == srt[:, :-1]).any(dim=1)
        if bool(dup.any()):
            row = int(dup.nonzero()[0, 0])
            raise ValueError(
                f"elite_idx: expected distinct candidates per row, row {row} repeats one: "
                f"{elite_idx[row].tolist()}"
            )
    return elite_idx, counts


def _cem_update(
    backend: str,
    p_mu: Param,
    p_sigma: Param,
    elite_idx: torch.Tensor,
    shape: list[int],
    k: int,
    seed: int | torch.Tensor,
    rnd: int | torch.Tensor,
    row_offset: int | torch.Tensor,
    alpha: float,
    min_sigma: float,
    per_element: bool,
    counts: torch.Tensor | None,
    wrap: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (mu_new, sigma_new) of shapes ``shape`` (B, *S) and (B, *S) or (B,) pooled, on
    ``backend`` (arguments validated by the caller; ``wrap``: launch the Triton kernel through
    wrap_triton)."""
    device = elite_idx.device
    batch = shape[0]
    numel = math.prod(shape[1:])
    if backend == "reference":
        s, r = seed_values(seed, rnd)
        mu_new, sigma_new = cem_update_reference(
            p_mu,
            p_sigma,
            elite_idx,
            batch=batch,
            numel=numel,
            k=k,
            seed=s,
            rnd=r,
            alpha=alpha,
            min_sigma=min_sigma,
            per_element=per_element,
            row_offset=int(row_offset),
            counts=counts,
        )
        mu_out = alloc(tuple(shape), torch.float32, device)
        sigma_out = alloc(tuple(shape) if per_element else (batch,), torch.float32, device)
        mu_out.copy_(mu_new.reshape(mu_out.shape))
        sigma_out.copy_(sigma_new.reshape(sigma_out.shape))
        return mu_out, sigma_out

    mu_out = alloc(tuple(shape), torch.float32, device)
    sigma_out = alloc(tuple(shape) if per_element else (batch,), torch.float32, device)
    if backend in ("cpp", "cuda"):
        _cpp.cem_update_out(
            mu_out,
            sigma_out,
            p_mu,
            p_sigma,
            elite_idx,
            k=k,
            seed=seed,
            rnd=rnd,
            alpha=alpha,
            min_sigma=min_sigma,
            per_element=per_element,
            row_offset=row_offset,
            counts=counts,
        )
        return mu_out, sigma_out

    _launch_triton(
        mu_out, sigma_out, p_mu, p_sigma, elite_idx, k, seed, rnd, row_offset, alpha,
        min_sigma, per_element, counts, wrap,
    )  # fmt: skip
    return mu_out, sigma_out


#: Elites one program draws at a time: ELITES x (its groups) independent Philox chains.
ELITES = 4
#: Rows one launch covers (the grid's second axis holds at most 65535).
_MAX_GRID_ROWS = 65535


def cem_block_size(numel: int) -> int:
    """Elements per program of the Triton kernel: a function of D alone (never of B), so that
    a row's pooled sum, added block by block, is the same bits whatever the batch: 512, or
    256 when D is small enough that bigger blocks would leave the GPU with few programs."""
    return block_size(numel, 512 if numel >= 2**15 else 256)


def cem_num_warps(block: int) -> int:
    """Warps a program of ``block`` elements runs: one Philox group (4 elements) a thread, so
    that a thread holds ELITES chains, not 2 x ELITES (sm_90, Triton 3.6: 96 registers a
    thread instead of 158, 20 resident warps an SM instead of 12; see benchmarks/RESULTS.md,
    issue 22)."""
    return max(1, min(4, block // 128))


def _launch_triton(
    mu_out: torch.Tensor,
    sigma_out: torch.Tensor,
    p_mu: Param,
    p_sigma: Param,
    elite_idx: torch.Tensor,
    k: int,
    seed: int | torch.Tensor,
    rnd: int | torch.Tensor,
    row_offset: int | torch.Tensor,
    alpha: float,
    min_sigma: float,
    per_element: bool,
    counts: torch.Tensor | None,
    wrap: bool,
) -> None:
    """The Triton kernels: grid (element blocks, rows); pooled, then one program a row adds
    the blocks' variance sums in a fixed order (no torch epilogue)."""
    batch, numel = mu_out.shape[0], mu_out[0].numel()
    device = mu_out.device
    block = cem_block_size(numel)
    n_blocks = triton.cdiv(numel, block)
    # Pointers the kernel does not touch get a tensor that is no output: a traced graph
    # (wrap_triton) must never see an output passed twice.
    unused = elite_idx
    var_part = unused if per_element else alloc((batch, n_blocks), torch.float32, device)
    for row0 in range(0, batch, _MAX_GRID_ROWS):
        rows = min(_MAX_GRID_ROWS, batch - row0)
        kernel(_cem_update_kernel, wrap)[(n_blocks, rows)](
            mu_out,
            sigma_out,
            var_part,
            p_mu.tensor if p_mu.tensor is not None else unused,
            p_sigma.tensor if p_sigma.tensor is not None else unused,
            elite_idx,
            counts if counts is not None else elite_idx,
            mu_val=p_mu.value,
            sigma_val=p_sigma.value,
            alpha=alpha,
            min_sigma=min_sigma,
            D=numel,
            K=k,
            T=elite_idx.shape[1],
            row0=row0,
            stride_mu_b=p_mu.stride_b,
            stride_mu_e=p_mu.stride_e,
            stride_sigma_b=p_sigma.stride_b,
            stride_sigma_e=p_sigma.stride_e,
            stride_idx_b=elite_idx.stride(0),
            stride_idx_t=elite_idx.stride(1),
            stride_counts=counts.stride(0) if counts is not None else 0,
            MU_MODE=int(p_mu.mode),
            SIGMA_MODE=int(p_sigma.mode),
            PER_ELEMENT=per_element,
            HAS_COUNTS=counts is not None,
            BLOCK=block,
            ELITES=ELITES,
            num_warps=cem_num_warps(block),
            **seed_args(seed, rnd, device, row_offset, traced=wrap),
        )
        if not per_element:
            kernel(_cem_pool_kernel, wrap)[(rows,)](
                sigma_out,
                var_part,
                p_sigma.tensor if p_sigma.tensor is not None else unused,
                counts if counts is not None else elite_idx,
                sigma_val=p_sigma.value,
                alpha=alpha,
                min_sigma=min_sigma,
                D=numel,
                n_blocks=n_blocks,
                row0=row0,
                stride_sigma_b=p_sigma.stride_b,
                stride_counts=counts.stride(0) if counts is not None else 0,
                SIGMA_MODE=int(p_sigma.mode),
                HAS_COUNTS=counts is not None,
                BLOCK_P=256,
            )


def _cem_update_op(
    mu: torch.Tensor | None,
    mu_val: float,
    sigma: torch.Tensor | None,
    sigma_val: float,
    elite_idx: torch.Tensor,
    shape: list[int],
    k: int,
    seed_t: torch.Tensor | None,
    seed_lo: int,
    seed_hi: int,
    round_t: torch.Tensor | None,
    round: int,
    row_offset_t: torch.Tensor | None,
    row_offset: int,
    alpha: float,
    min_sigma: float,
    per_element: bool,
    counts: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``smartgrpo_fast::cem_update`` on the backend :func:`resolve_backend` picks now (see
    :mod:`smartgrpo_fast.ops._library` for the argument forms)."""
    return _cem_update(
        resolve_backend(elite_idx.device),
        param_of(mu, mu_val),
        param_of(sigma, sigma_val),
        elite_idx,
        shape,
        k,
        seed_of(seed_t, seed_lo, seed_hi),
        int_of(round_t, round),
        int_of(row_offset_t, row_offset),
        alpha,
        min_sigma,
        per_element,
        counts,
    )


def _cem_update_fake(
    mu, mu_val, sigma, sigma_val, elite_idx, shape, k, seed_t, seed_lo, seed_hi, round_t, round,
    row_offset_t, row_offset, alpha, min_sigma, per_element, counts,
):  # fmt: skip
    mu_out = elite_idx.new_empty(shape, dtype=torch.float32)
    sigma_out = elite_idx.new_empty(shape if per_element else shape[:1], dtype=torch.float32)
    return mu_out, sigma_out


define_op(
    (
        "cem_update(Tensor? mu, float mu_val, Tensor? sigma, float sigma_val, "
        "Tensor elite_idx, SymInt[] shape, SymInt k, "
        "Tensor? seed_t, SymInt seed_lo, SymInt seed_hi, Tensor? round_t, SymInt round, "
        "Tensor? row_offset_t, SymInt row_offset, "
        "float alpha, float min_sigma, bool per_element, Tensor? counts) -> (Tensor, Tensor)"
    ),
    _cem_update_op,
    _cem_update_fake,
)


if triton is not None:

    @torch.library.triton_op("smartgrpo_fast::cem_update_triton", mutates_args=())
    def _cem_update_triton_op(
        mu: torch.Tensor | None,
        mu_val: float,
        sigma: torch.Tensor | None,
        sigma_val: float,
        elite_idx: torch.Tensor,
        shape: list[int],
        k: int,
        seed_t: torch.Tensor | None,
        seed_lo: int,
        seed_hi: int,
        round_t: torch.Tensor | None,
        round: int,
        row_offset_t: torch.Tensor | None,
        row_offset: int,
        alpha: float,
        min_sigma: float,
        per_element: bool,
        counts: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``smartgrpo_fast::cem_update_triton``: the Triton kernel (what torch.compile traces
        under the ``triton`` backend)."""
        return _cem_update(
            "triton",
            param_of(mu, mu_val),
            param_of(sigma, sigma_val),
            elite_idx,
            shape,
            k,
            seed_of(seed_t, seed_lo, seed_hi),
            int_of(round_t, round),
            int_of(row_offset_t, row_offset),
            alpha,
            min_sigma,
            per_element,
            counts,
            wrap=True,
        )


def cem_update(
    mu: float | torch.Tensor,
    sigma: float | torch.Tensor,
    elite_idx: torch.Tensor,
    *,
    shape: Sequence[int] | torch.Size,
    k: int,
    seed: int | torch.Tensor,
    round: int | torch.Tensor,
    alpha: float = 1.0,
    min_sigma: float = 0.0,
    per_element: bool = True,
    validate: bool = True,
    row_offset: int | torch.Tensor = 0,
    counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One CEM refinement of N(mu, sigma^2) from the elites of one ``sample_perturb`` call.

    Args:
        mu: the current mean: a float, a 0-d or (B,) tensor, or broadcastable to (B, *S).
        sigma: the current std, same forms (>= 0); with ``per_element=False`` a float or a
            0-d or (B,) tensor.
        elite_idx: (B, T) int64 (or int32) candidate indices, e.g. ``topk_select``'s output;
            1 <= T <= k, distinct per row.
        shape: the (B, *S) shape of the mean given to ``sample_perturb``.
        k: the K given to ``sample_perturb``.
        seed, round: the seed and round given to ``sample_perturb`` (ints or 0-d int64
            tensors on elite_idx's device).
        alpha: smoothing in (0, 1]; 1 is textbook CEM.
        min_sigma: floor of the new std, >= 0.
        per_element: a std per element (True) or one pooled std per row (False).
        validate: check tensor values (indices in range and distinct, finite mu/sigma,
            round and row_offset range). Reads them, synchronising a CUDA stream; skipped in
            graph capture.
        row_offset: the ``row_offset`` given to ``sample_perturb`` (int or 0-d int64 tensor,
            read inside the kernel): row b's elites are candidates of the stream's row
            ``b + row_offset``.
        counts: None (every row uses its T elites), or a (B,) int64 tensor on elite_idx's
            device, read inside the kernel: row b updates from the first ``counts[b]`` entries
            of ``elite_idx[b]`` only (``topk_select`` ranks NaN last, so the number of finite
            elite rewards keeps NaN-scored candidates out). ``counts[b] == 0`` keeps row b's mu
            and sigma exactly (broadcast to the output shape; no ``min_sigma`` floor);
            ``counts[b] == 1`` gives that elite's eps and a std of 0. ``0 <= counts <= T``,
            checked with ``validate`` (elite indices are then checked only where used); a
            count outside [0, T] with ``validate=False`` turns that row into NaN.

    Returns:
        (mu_new, sigma_new): float32 (B, *S) and float32 (B, *S), or (B,) when pooled.

    Calls ``torch.ops.smartgrpo_fast.cem_update`` (under ``torch.compile``, which skips the
    argument checks, ``cem_update_triton`` when the backend is ``triton``); an eager call with
    ``validate=False`` runs a cached plan instead (see :mod:`smartgrpo_fast.ops._fast`).
    """
    if not validate and not compiling():
        try:  # a malformed argument (no tensor, unhashable) takes the checks below
            T = torch.Tensor  # the forms of the plan key, inline: see ops._fast.form
            key = (
                backend_env(), torch.is_grad_enabled(), k, k.__class__, per_element,
                shape if shape.__class__ is torch.Size else (shape.__class__, *shape),
                elite_idx.shape, elite_idx.stride(), elite_idx.dtype, elite_idx.device,
                (mu.shape, mu.stride(), mu.dtype, mu.device, mu.requires_grad)
                if isinstance(mu, T) else mu.__class__,
                (sigma.shape, sigma.stride(), sigma.dtype, sigma.device, sigma.requires_grad)
                if isinstance(sigma, T) else sigma.__class__,
                int if seed.__class__ is int else form(seed),
                int if round.__class__ is int else form(round),
                int if row_offset.__class__ is int else form(row_offset),
                None if counts is None else form(counts),
            )  # fmt: skip
            plan = _PLANS.lookup(key)
        except (AttributeError, TypeError):
            plan = None
        if plan is MISSING:
            plan = _plan(mu, sigma, elite_idx, shape, k, seed, round, alpha, min_sigma,
                         per_element, row_offset, counts)  # fmt: skip
            _PLANS.put(key, plan)
        if plan is not None:
            out = plan(mu, sigma, elite_idx, seed, round, alpha, min_sigma, row_offset, counts)
            if out is not None:
                return out
    if not compiling():
        shape, seed, round, row_offset = _validate(
            mu, sigma, elite_idx, shape, k, seed, round, alpha, min_sigma, per_element,
            validate, row_offset, counts,
        )  # fmt: skip
    batch, inner = shape[0], tuple(shape[1:])
    op = torch.ops.smartgrpo_fast.cem_update
    if compiling() and trace_triton(elite_idx.device, _BACKENDS):
        op = torch.ops.smartgrpo_fast.cem_update_triton
    return op(
        *param_arg(mu, batch, inner),
        *param_arg(sigma, batch, inner),
        elite_idx,
        list(shape),
        k,
        *seed_arg(seed),
        *int_arg(round),
        *int_arg(row_offset),
        float(alpha),
        float(min_sigma),
        bool(per_element),
        counts,
    )


def _validate(
    mu: object,
    sigma: object,
    elite_idx: object,
    shape: object,
    k: object,
    seed: object,
    rnd: object,
    alpha: object,
    min_sigma: object,
    per_element: bool,
    validate: bool,
    row_offset: object,
    counts: object,
) -> tuple[tuple[int, ...], int | torch.Tensor, int | torch.Tensor, int | torch.Tensor]:
    """Check cem_update's arguments (see its docstring); the validated shape, seed, round and
    row offset."""
    shape = check_shape(shape, layout="(B, *S)", min_dims=1)
    batch, inner = shape[0], shape[1:]
    numel = math.prod(inner)
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k: expected an int >= 1, got {describe(k)}")
    if k < 1:
        raise ValueError(f"k: expected an int >= 1, got {k}")
    check_stream_limits(batch, k, numel)
    elite_idx, counts = _check_elite_idx(elite_idx, batch, k, validate, counts)
    device = elite_idx.device
    check_no_grad("cem_update", mu=mu, sigma=sigma)
    for name, val in (("alpha", alpha), ("min_sigma", min_sigma)):
        if isinstance(val, bool) or not isinstance(val, (int, float)):
            raise TypeError(f"{name}: expected a float, got {describe(val)}")
    check_finite_values("alpha", float(alpha))
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha: expected 0 < alpha <= 1, got {alpha}")
    check_finite_values("min_sigma", float(min_sigma), nonnegative=True)
    kw = {"batch": batch, "inner": inner, "device": device, "validate": validate}
    normalize_param("mu", mu, **kw)
    p_sigma = normalize_param("sigma", sigma, nonnegative=True, **kw)
    if not per_element and p_sigma.mode == Mode.ELEM:
        raise ValueError(
            f"sigma: per_element=False pools the std to one value per row, so sigma must be a "
            f"float or a 0-d or ({batch},) tensor, got {describe(sigma)}"
        )
    seed = check_seed(seed, device)
    rnd = check_round(rnd, device, validate=validate)
    row_offset = check_row_offset(row_offset, batch, device, validate=validate)
    return shape, seed, rnd, row_offset


_PLANS = PlanCache()
_NUMBER = (int, float)


def _plan(mu, sigma, elite_idx, shape, k, seed, rnd, alpha, min_sigma, per_element, row_offset,
          counts):  # fmt: skip
    """The fast path's plan for the forms of these arguments (validated here: a bad one
    raises). The plan returns (mu_new, sigma_new), or None when a value no key holds is out of
    range (then the slow path raises the usual error)."""
    shape, _, _, _ = _validate(mu, sigma, elite_idx, shape, k, seed, rnd, alpha, min_sigma,
                               per_element, False, row_offset, counts)  # fmt: skip
    if not all(type(s) is int for s in shape):  # bools pass check_shape as ints: not in a key
        return None
    backend = resolve_backend(elite_idx.device)
    batch, inner = shape[0], tuple(shape[1:])
    device = elite_idx.device
    sigma_shape = shape if per_element else (batch,)
    mu_num, sigma_num = (not isinstance(x, torch.Tensor) for x in (mu, sigma))
    ints = not any(isinstance(x, torch.Tensor) for x in (seed, rnd, row_offset))
    offset_end = U32 - batch + 1  # row_offset + B <= 2**32
    isfinite = math.isfinite

    def ok(mu, sigma, seed, rnd, alpha, min_sigma, row_offset) -> bool:
        return (
            (not mu_num or isfinite(mu))
            and (not sigma_num or (isfinite(sigma) and sigma >= 0))
            and alpha.__class__ in _NUMBER
            and 0.0 < alpha <= 1.0
            and min_sigma.__class__ in _NUMBER
            and isfinite(min_sigma)
            and min_sigma >= 0
            and (isinstance(seed, torch.Tensor) or 0 <= seed < U64)
            and (isinstance(rnd, torch.Tensor) or 0 <= rnd < U32)
            and (isinstance(row_offset, torch.Tensor) or 0 <= row_offset < offset_end)
        )

    if backend != "cpp":

        def generic(mu, sigma, elite_idx, seed, rnd, alpha, min_sigma, row_offset, counts):
            if not ok(mu, sigma, seed, rnd, alpha, min_sigma, row_offset):
                return None
            return _cem_update(
                backend,
                param_of(*param_arg(mu, batch, inner)),
                param_of(*param_arg(sigma, batch, inner)),
                elite_idx,
                list(shape),
                k,
                seed,
                rnd,
                row_offset,
                float(alpha),
                float(min_sigma),
                per_element,
                counts,
            )

        return generic

    from smartgrpo_fast.ops.sample_perturb import _cpp_param

    op = direct(torch.ops.smartgrpo_fast.cem_update_out.default)
    packed = direct(torch.ops.smartgrpo_fast.cem_update_out.packed)  # int seeds: 8 arguments
    conv_mu = _cpp_param(mu, batch, inner)
    conv_sigma = _cpp_param(sigma, batch, inner)

    def cpp_general(mu, sigma, elite_idx, seed, rnd, alpha, min_sigma, row_offset, counts):
        if not ok(mu, sigma, seed, rnd, alpha, min_sigma, row_offset):
            return None
        mu_out = alloc(shape, torch.float32, device)
        sigma_out = alloc(sigma_shape, torch.float32, device)
        op(
            mu_out,
            sigma_out,
            *((None, float(mu)) if mu_num else (conv_mu(mu), 0.0)),
            *((None, float(sigma)) if sigma_num else (conv_sigma(sigma), 0.0)),
            elite_idx,
            k,
            *seed_words(seed),
            *int_words(rnd),
            *int_words(row_offset),
            float(alpha),
            float(min_sigma),
            per_element,
            counts,
        )
        return mu_out, sigma_out

    if not ints:  # a seed, round or offset tensor
        return cpp_general

    def cpp(mu, sigma, elite_idx, seed, rnd, alpha, min_sigma, row_offset, counts):
        # int seed, round and row offset: the hot loop's case, every check inline
        if (
            (mu_num and not isfinite(mu))
            or (sigma_num and not (isfinite(sigma) and sigma >= 0))
            or alpha.__class__ not in _NUMBER
            or min_sigma.__class__ not in _NUMBER
            or not (0.0 < alpha <= 1.0 and isfinite(min_sigma) and min_sigma >= 0)
            or not (0 <= seed < U64 and 0 <= rnd < U32 and 0 <= row_offset < offset_end)
        ):
            return None
        mu_out = alloc(shape, torch.float32, device)
        sigma_out = alloc(sigma_shape, torch.float32, device)
        packed(
            mu_out,
            sigma_out,
            None if mu_num else conv_mu(mu),
            None if sigma_num else conv_sigma(sigma),
            elite_idx,
            counts,
            [mu if mu_num else 0.0, sigma if sigma_num else 0.0, alpha, min_sigma],
            [k, seed & 0xFFFFFFFF, seed >> 32, rnd, row_offset, per_element],
        )
        return mu_out, sigma_out

    return cpp
