"""The one noise stream of smartgrpo_fast: Philox4x32-10 keyed by (seed, round, row, candidate).

Every backend (the PyTorch reference below, the Triton kernels, the C++ and CUDA C++ ops of
``smartgrpo_fast/csrc``, whose ``philox.h`` implements this contract) draws the
standard normal ``n[b, j, e]`` of row ``b``, candidate ``j`` and flat element ``e`` (row-major
over the trailing shape ``S``, ``D = prod(S)`` elements) like this:

* **key** ``(k0, k1) = (seed mod 2**32, seed >> 32)``, ``seed`` in ``[0, 2**64)``;
* **counter** ``(c0, c1, c2, c3) = (e // 4, j, b + row_offset, round)``, each a 32-bit word,
  where ``row_offset`` (default 0) is the ops' keyword of that name;
* ``(x0, x1, x2, x3) = Philox4x32-10(counter, key)`` with the Random123 constants
  (multipliers ``0xD2511F53``, ``0xCD9E8D57``; Weyl key increments ``0x9E3779B9``,
  ``0xBB67AE85``), ten rounds, bit-identical to Triton's ``philox_impl``;
* each word becomes a uniform in (0, 1) exactly representable in float32:
  ``u = ((x >> 8) + 0.5) * 2**-24``;
* Box-Muller on the pairs ``(u0, u1)`` and ``(u2, u3)``, in float32:
  ``r = sqrt(-2 ln u_first)``, ``theta = 2 pi u_second`` (2 pi rounded to float32),
  ``n[4g] = r cos theta``, ``n[4g+1] = r sin theta`` for the first pair, and
  ``n[4g+2], n[4g+3]`` likewise from the second.

So the noise of candidate ``j`` of row ``b`` does not depend on how many rows or candidates a
call has: growing K adds candidates without changing the first ones, and ``cem_update`` can
regenerate any elite's noise from its index alone. ``row_offset`` shifts the row word: a call
on rows ``[o, o + B)`` of a larger batch with ``row_offset=o`` draws exactly the noise those
rows draw in the call on the whole batch (so a batch can be split into chunks, or sharded
across ranks, without changing the stream).

Limits (checked, a ValueError beyond them): rows ``b + row_offset < 2**32``, candidates
``j < 2**32``,
``round < 2**32``, ``D <= 2**34`` elements per (row, candidate). Beyond ``D = 2**34`` the
element counter would wrap and repeat noise, so it is refused rather than widened. The
integers are identical on every backend; the normals differ only by the float32 rounding of
log, sqrt, cos and sin (measured in ``tests/test_philox.py``; see docs/noise-stream.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from smartgrpo_fast.ops import _cpp
from smartgrpo_fast.ops._common import (
    alloc,
    check_round,
    check_row_offset,
    check_seed,
    check_shape,
    check_stream_limits,
    describe,
    resolve_backend,
    seed_words,
)
from smartgrpo_fast.ops._library import (
    compiling,
    define_op,
    int_arg,
    int_of,
    kernel,
    seed_arg,
    seed_of,
    trace_triton,
)
from smartgrpo_fast.ops._triton import block_size, interpret_block_cap, interpreting, tl, triton

__all__ = [
    "PHILOX_M0",
    "PHILOX_M1",
    "PHILOX_W0",
    "PHILOX_W1",
    "TWO_PI_F32",
    "normals_reference",
    "philox4x32_10_reference",
    "philox_normal",
]

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
_MASK32 = 0xFFFFFFFF
_BACKENDS = ("reference", "cpp", "cuda", "triton")
#: 2 pi rounded to float32, the exact constant every backend multiplies by.
TWO_PI_F32 = 6.2831854820251465
#: 2**-24: the uniform step.
_U_STEP = 5.9604644775390625e-08


# --------------------------------------------------------------------------------------
# PyTorch reference (integer tensor arithmetic; the oracle of every backend)
# --------------------------------------------------------------------------------------


def philox4x32_10_reference(
    c0: torch.Tensor,
    c1: torch.Tensor,
    c2: torch.Tensor,
    c3: torch.Tensor,
    k0: int,
    k1: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 on int64 tensors that hold unsigned 32-bit words.

    The 32x32-bit products wrap in int64; ``(p >> 32) & 0xFFFFFFFF`` is still the high word.
    Counters broadcast against each other; returns four int64 tensors of words in [0, 2**32).
    """
    for _ in range(10):
        p0 = c0 * PHILOX_M0
        p1 = c2 * PHILOX_M1
        c0, c1, c2, c3 = (
            ((p1 >> 32) & _MASK32) ^ c1 ^ k0,
            p1 & _MASK32,
            ((p0 >> 32) & _MASK32) ^ c3 ^ k1,
            p0 & _MASK32,
        )
        k0 = (k0 + PHILOX_W0) & _MASK32
        k1 = (k1 + PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def _uniform_reference(x: torch.Tensor) -> torch.Tensor:
    return ((x >> 8).to(torch.float32) + 0.5) * _U_STEP


def _box_muller_reference(
    x_a: torch.Tensor, x_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.sqrt(-2.0 * torch.log(_uniform_reference(x_a)))
    theta = _uniform_reference(x_b) * TWO_PI_F32
    return r * torch.cos(theta), r * torch.sin(theta)


def normals_reference(
    seed: int, rnd: int, rows: torch.Tensor, cands: torch.Tensor, numel: int
) -> torch.Tensor:
    """Normals ``n[rows[p], cands[p], 0:numel]`` of the stream, as float32 ``(*P, numel)``.

    ``rows`` (the stream's row words: a call's row plus its row offset) and ``cands`` are int64
    tensors broadcastable to a common shape ``P``; ``seed`` and ``rnd`` are plain ints
    (validated by the caller).
    """
    k0, k1 = seed_words(seed)
    rows, cands = torch.broadcast_tensors(rows.to(torch.int64), cands.to(torch.int64))
    groups = (numel + 3) // 4
    g = torch.arange(groups, dtype=torch.int64, device=rows.device)
    c0 = g.expand(*rows.shape, groups)
    c1 = (cands & _MASK32).unsqueeze(-1)
    c2 = (rows & _MASK32).unsqueeze(-1)
    c3 = torch.full((), int(rnd) & _MASK32, dtype=torch.int64, device=rows.device)
    x0, x1, x2, x3 = philox4x32_10_reference(c0, c1, c2, c3, k0, k1)
    n0, n1 = _box_muller_reference(x0, x1)
    n2, n3 = _box_muller_reference(x2, x3)
    n = torch.stack((n0, n1, n2, n3), dim=-1).reshape(*rows.shape, 4 * groups)
    return n[..., :numel]


# --------------------------------------------------------------------------------------
# Triton device functions (imported by every kernel that draws noise)
# --------------------------------------------------------------------------------------

if triton is not None:
    _M0 = tl.constexpr(PHILOX_M0)
    _M1 = tl.constexpr(PHILOX_M1)
    _W0 = tl.constexpr(PHILOX_W0)
    _W1 = tl.constexpr(PHILOX_W1)
    _TWO_PI = tl.constexpr(TWO_PI_F32)
    _STEP = tl.constexpr(_U_STEP)

    @triton.jit
    def philox4x32_10(c0, c1, c2, c3, k0, k1):
        """Ten Philox rounds on uint32 blocks ``c0..c3`` with uint32 key words ``k0, k1``."""
        for _ in tl.static_range(10):
            hi0 = tl.umulhi(c0, _M0)
            lo0 = c0 * _M0
            hi1 = tl.umulhi(c2, _M1)
            lo1 = c2 * _M1
            c0 = hi1 ^ c1 ^ k0
            c1 = lo1
            c2 = hi0 ^ c3 ^ k1
            c3 = lo0
            k0 = k0 + _W0
            k1 = k1 + _W1
        return c0, c1, c2, c3

    @triton.jit
    def sincos_0_2pi(x):
        """(sin x, cos x) for float32 ``x`` in [0, 2 pi]: one Cody-Waite range reduction shared
        by both (Cephes sinf/cosf, the polynomials of the C++ ops' ``sincos_0_2pi``), within
        ~1 ulp, and no slow path for large arguments (Box-Muller's angle never needs one)."""
        j = (x * 1.27323954473516).to(tl.int32)  # x / (pi / 4), truncated (x >= 0)
        j = (j + 1) & -2
        y = j.to(tl.float32)
        r = ((x - y * 0.78515625) - y * 2.4187564849853515625e-4) - y * 3.77489497744594108e-8
        z = r * r
        ps = ((-1.9515295891e-4 * z + 8.3321608736e-3) * z - 1.6666654611e-1) * z * r + r
        pc = ((2.443315711809948e-5 * z - 1.388731625493765e-3) * z + 4.166664568298827e-2) * z
        pc = pc * z - 0.5 * z + 1.0
        q = j >> 1  # quadrant, 0..4
        swap = (q & 1) != 0
        s = tl.where(swap, pc, ps)
        c = tl.where(swap, ps, pc)
        s = tl.where((q & 2) != 0, -s, s)
        c = tl.where(((q + 1) & 2) != 0, -c, c)
        return s, c

    @triton.jit
    def _box_muller(x_a, x_b):
        u_a = ((x_a >> 8).to(tl.float32) + 0.5) * _STEP
        u_b = ((x_b >> 8).to(tl.float32) + 0.5) * _STEP
        r = tl.sqrt_rn(-2.0 * tl.log(u_a))
        s, c = sincos_0_2pi(u_b * _TWO_PI)
        return r * c, r * s

    @triton.jit
    def load_key(seed_ptr, seed_lo, seed_hi, SEED_FROM_PTR: tl.constexpr):
        """The two uint32 key words, from a 0-d int64 tensor or from two int arguments."""
        if SEED_FROM_PTR:
            s = tl.load(seed_ptr)
            k0 = s.to(tl.uint32)
            k1 = (s >> 32).to(tl.uint32)
        else:
            k0 = tl.cast(seed_lo, tl.uint32)
            k1 = tl.cast(seed_hi, tl.uint32)
        return k0, k1

    @triton.jit
    def load_round(round_ptr, round_val, ROUND_FROM_PTR: tl.constexpr):
        """The uint32 round word, from a 0-d int64 tensor or an int argument."""
        if ROUND_FROM_PTR:
            r = tl.load(round_ptr).to(tl.uint32)
        else:
            r = tl.cast(round_val, tl.uint32)
        return r

    @triton.jit
    def load_row_offset(row_offset_ptr, row_offset_val, ROW_OFFSET_FROM_PTR: tl.constexpr):
        """The int64 row offset, from a 0-d int64 tensor or an int argument; row ``b`` of the
        call draws the stream's row word ``b + row_offset``."""
        if ROW_OFFSET_FROM_PTR:
            o = tl.load(row_offset_ptr).to(tl.int64)
        else:
            o = tl.cast(row_offset_val, tl.int64)
        return o

    @triton.jit
    def philox_normal4(g, j, b, rnd, k0, k1):
        """The four float32 normals ``(n[4g], n[4g+1], n[4g+2], n[4g+3])`` of Philox groups
        ``g`` of slice (row word b, candidate j). ``g`` and ``j`` are int tensors (or scalars)
        that broadcast against each other, e.g. (1, G) groups and (E, 1) candidates give
        (E, G) tiles of E independent Philox chains; ``b`` is the stream's row (the call's row
        plus the row offset)."""
        c0 = tl.cast(g, tl.uint32)
        c1 = tl.cast(j, tl.uint32)
        c2 = tl.cast(b, tl.uint32)
        x0, x1, x2, x3 = philox4x32_10(c0, c1, c2, rnd, k0, k1)
        n0, n1 = _box_muller(x0, x1)
        n2, n3 = _box_muller(x2, x3)
        return n0, n1, n2, n3

    @triton.jit
    def philox_normal_block(blk, j, b, rnd, k0, k1, BLOCK: tl.constexpr):
        """float32 normals of elements ``blk*BLOCK + arange(BLOCK)`` of slice (row word b,
        candidate j); ``b`` is the stream's row (the call's row plus the row offset)."""
        GROUPS: tl.constexpr = BLOCK // 4
        g = tl.cast(blk, tl.int64) * GROUPS + tl.arange(0, GROUPS)
        zero = tl.zeros([GROUPS], dtype=tl.uint32)
        n0, n1, n2, n3 = philox_normal4(g, zero + tl.cast(j, tl.uint32), b, rnd, k0, k1)
        # (GROUPS, 2, 2) flattened row-major is n0, n1, n2, n3 per group: element order.
        return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), [BLOCK])

    @triton.jit
    def quad_tile(n0, n1, n2, n3):
        """The (G, 4) tile ``[n0, n1, n2, n3]`` of four (G,) vectors, built by selects (no
        join, no reshape): with the 4 in one thread's registers it stays in registers."""
        w = tl.arange(0, 4)[None, :]
        t = tl.where(w == 0, n0[:, None], n1[:, None])
        t = tl.where(w == 2, n2[:, None], t)
        return tl.where(w == 3, n3[:, None], t)

    @triton.jit(do_not_specialize=["seed_lo", "seed_hi", "round_val", "row_offset_val", "K"])
    def _philox_normal_kernel(
        out_ptr,
        seed_ptr,
        round_ptr,
        row_offset_ptr,
        seed_lo,
        seed_hi,
        round_val,
        row_offset_val,
        D,
        K,
        n_blocks,
        SEED_FROM_PTR: tl.constexpr,
        ROUND_FROM_PTR: tl.constexpr,
        ROW_OFFSET_FROM_PTR: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        blk = pid % n_blocks
        row = pid // n_blocks  # row = b * K + j
        j = row % K
        b = row // K
        k0, k1 = load_key(seed_ptr, seed_lo, seed_hi, SEED_FROM_PTR)
        rnd = load_round(round_ptr, round_val, ROUND_FROM_PTR)
        b_word = b + load_row_offset(row_offset_ptr, row_offset_val, ROW_OFFSET_FROM_PTR)
        n = philox_normal_block(blk, j, b_word, rnd, k0, k1, BLOCK)
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + row * D + offs, n, mask=offs < D)

    @triton.jit
    def _philox_bits_kernel(ctr_ptr, out_ptr, k0, k1, N, BLOCK: tl.constexpr):
        """Raw Philox words for N counters (N, 4) -> (N, 4); test hook for bit-exactness."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        c0 = tl.load(ctr_ptr + offs * 4 + 0, mask=mask, other=0).to(tl.uint32)
        c1 = tl.load(ctr_ptr + offs * 4 + 1, mask=mask, other=0).to(tl.uint32)
        c2 = tl.load(ctr_ptr + offs * 4 + 2, mask=mask, other=0).to(tl.uint32)
        c3 = tl.load(ctr_ptr + offs * 4 + 3, mask=mask, other=0).to(tl.uint32)
        x0, x1, x2, x3 = philox4x32_10(
            c0, c1, c2, c3, tl.cast(k0, tl.uint32), tl.cast(k1, tl.uint32)
        )
        tl.store(out_ptr + offs * 4 + 0, x0.to(tl.int64), mask=mask)
        tl.store(out_ptr + offs * 4 + 1, x1.to(tl.int64), mask=mask)
        tl.store(out_ptr + offs * 4 + 2, x2.to(tl.int64), mask=mask)
        tl.store(out_ptr + offs * 4 + 3, x3.to(tl.int64), mask=mask)


def noise_block_size(numel: int) -> int:
    """Elements per program for noise kernels: a multiple of 4, large when interpreting."""
    return block_size(numel, 1024)


_PLACEHOLDERS: dict[torch.device, torch.Tensor] = {}


def placeholder(device: torch.device) -> torch.Tensor:
    """A 0-d int64 tensor on ``device``, created once per device: what a kernel gets for a
    pointer argument it never reads (a seed, round or row offset given as an int)."""
    t = _PLACEHOLDERS.get(device)
    if t is None:
        t = _PLACEHOLDERS[device] = torch.zeros((), dtype=torch.int64, device=device)
    return t


def seed_args(
    seed: int | torch.Tensor,
    rnd: int | torch.Tensor,
    device: torch.device,
    row_offset: int | torch.Tensor = 0,
    traced: bool = False,
) -> dict:
    """Kernel arguments for a seed, a round and a row offset that are ints or 0-d int64
    tensors (a tensor is passed as a pointer the kernel reads). An int's pointer argument is
    the device's :func:`placeholder` (no allocation), or a fresh tensor when ``traced``
    (inside ``wrap_triton``, where a tensor made outside the trace cannot go)."""
    seed_from_ptr = isinstance(seed, torch.Tensor)
    round_from_ptr = isinstance(rnd, torch.Tensor)
    offset_from_ptr = isinstance(row_offset, torch.Tensor)
    dummy = None
    if not (seed_from_ptr and round_from_ptr and offset_from_ptr):
        dummy = torch.zeros((), dtype=torch.int64, device=device) if traced else placeholder(device)
    lo, hi = (0, 0) if seed_from_ptr else seed_words(seed)
    return {
        "seed_ptr": seed if seed_from_ptr else dummy,
        "round_ptr": rnd if round_from_ptr else dummy,
        "row_offset_ptr": row_offset if offset_from_ptr else dummy,
        "seed_lo": lo,
        "seed_hi": hi,
        "round_val": 0 if round_from_ptr else int(rnd),
        "row_offset_val": 0 if offset_from_ptr else int(row_offset),
        "SEED_FROM_PTR": seed_from_ptr,
        "ROUND_FROM_PTR": round_from_ptr,
        "ROW_OFFSET_FROM_PTR": offset_from_ptr,
    }


def seed_values(seed: int | torch.Tensor, rnd: int | torch.Tensor) -> tuple[int, int]:
    """Plain-int seed (in [0, 2**64)) and round (low 32 bits) for the references."""
    s = int(seed) % 2**64
    r = int(rnd) & _MASK32
    return s, r


def stream_rows(batch: int, row_offset: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    """The stream's row words of a call's rows, ``arange(batch) + row_offset``, int64 (B,)
    (for the references; a tensor offset is read here)."""
    return torch.arange(batch, dtype=torch.int64, device=device) + int(row_offset)


def _philox_normal(
    backend: str,
    shape: list[int],
    seed: int | torch.Tensor,
    rnd: int | torch.Tensor,
    row_offset: int | torch.Tensor,
    device: torch.device,
    wrap: bool = False,
) -> torch.Tensor:
    """float32 ``shape`` (B, k, *S) normals on ``backend`` (arguments validated by the caller;
    ``wrap``: launch the Triton kernel through wrap_triton)."""
    batch, k = shape[0], shape[1]
    numel = math.prod(shape[2:])
    if backend == "reference":
        s, r = seed_values(seed, rnd)
        rows = stream_rows(batch, row_offset, device).view(batch, 1)
        cands = torch.arange(k, device=device).view(1, k)
        out = alloc(tuple(shape), torch.float32, device)
        out.copy_(normals_reference(s, r, rows, cands, numel).reshape(shape))
        return out  # contiguous, like the fake kernel says
    out = alloc(tuple(shape), torch.float32, device)
    if backend in ("cpp", "cuda"):
        _cpp.philox_normal_out(out, seed, rnd, row_offset)
        return out
    block = noise_block_size(numel)
    n_blocks = triton.cdiv(numel, block)
    kernel(_philox_normal_kernel, wrap)[(n_blocks * batch * k,)](
        out,
        D=numel,
        K=k,
        n_blocks=n_blocks,
        BLOCK=block,
        **seed_args(seed, rnd, device, row_offset, traced=wrap),
    )
    return out


def _philox_normal_op(
    shape: list[int],
    seed_t: torch.Tensor | None,
    seed_lo: int,
    seed_hi: int,
    round_t: torch.Tensor | None,
    round: int,
    row_offset_t: torch.Tensor | None,
    row_offset: int,
    device: torch.device,
) -> torch.Tensor:
    """``smartgrpo_fast::philox_normal`` on the backend :func:`resolve_backend` picks now (see
    :mod:`smartgrpo_fast.ops._library` for the argument forms)."""
    seed = seed_of(seed_t, seed_lo, seed_hi)
    rnd, offset = int_of(round_t, round), int_of(row_offset_t, row_offset)
    return _philox_normal(resolve_backend(device), shape, seed, rnd, offset, device)


def _philox_normal_fake(
    shape, seed_t, seed_lo, seed_hi, round_t, round, row_offset_t, row_offset, device
):
    return torch.empty(shape, dtype=torch.float32, device=device)


define_op(
    (
        "philox_normal(SymInt[] shape, "
        "Tensor? seed_t, SymInt seed_lo, SymInt seed_hi, Tensor? round_t, SymInt round, "
        "Tensor? row_offset_t, SymInt row_offset, Device device) -> Tensor"
    ),
    _philox_normal_op,
    _philox_normal_fake,
)


if triton is not None:

    @torch.library.triton_op("smartgrpo_fast::philox_normal_triton", mutates_args=())
    def _philox_normal_triton_op(
        shape: list[int],
        seed_t: torch.Tensor | None,
        seed_lo: int,
        seed_hi: int,
        round_t: torch.Tensor | None,
        round: int,
        row_offset_t: torch.Tensor | None,
        row_offset: int,
        device: torch.device,
    ) -> torch.Tensor:
        """``smartgrpo_fast::philox_normal_triton``: the Triton kernel (what torch.compile
        traces under the ``triton`` backend)."""
        seed = seed_of(seed_t, seed_lo, seed_hi)
        rnd, offset = int_of(round_t, round), int_of(row_offset_t, row_offset)
        return _philox_normal("triton", shape, seed, rnd, offset, device, wrap=True)


def philox_normal(
    shape: Sequence[int] | torch.Size,
    *,
    seed: int | torch.Tensor,
    round: int | torch.Tensor = 0,
    device: torch.device | str | None = None,
    row_offset: int | torch.Tensor = 0,
) -> torch.Tensor:
    """The exact standard normals ``n`` that ``sample_perturb`` and ``cem_update`` use.

    Args:
        shape: ``(B, k, *S)``: rows, candidates and the per-candidate shape.
        seed: int in [0, 2**64) or a 0-d int64 tensor on ``device``.
        round: int in [0, 2**32) or a 0-d int64 tensor on ``device``.
        device: where to draw (default: the seed tensor's device, else CPU).
        row_offset: int or 0-d int64 tensor on ``device``, ``>= 0`` with
            ``row_offset + B <= 2**32``: row b draws the stream's row ``b + row_offset``, so
            ``philox_normal((B, ...), row_offset=o)`` equals rows ``[o, o + B)`` of
            ``philox_normal((o + B, ...))``.

    Returns:
        float32 tensor of ``shape``; ``n[b, j]`` is the noise of row ``b + row_offset``,
        candidate j.

    Calls ``torch.ops.smartgrpo_fast.philox_normal`` (under ``torch.compile``, which skips the
    argument checks, ``philox_normal_triton`` when the backend is ``triton``).
    """
    if device is None:
        device = seed.device if isinstance(seed, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    if not compiling():
        shape = check_shape(shape, layout="(B, k, *S)", min_dims=2)
        seed = check_seed(seed, device)
        rnd = check_round(round, device)
        check_stream_limits(shape[0], shape[1], math.prod(shape[2:]))
        row_offset = check_row_offset(row_offset, shape[0], device)
    else:
        rnd = round
    op = torch.ops.smartgrpo_fast.philox_normal
    if compiling() and trace_triton(device, _BACKENDS):
        op = torch.ops.smartgrpo_fast.philox_normal_triton
    return op(list(shape), *seed_arg(seed), *int_arg(rnd), *int_arg(row_offset), device)


def philox_bits(counters: torch.Tensor, k0: int, k1: int) -> torch.Tensor:
    """Raw Philox4x32-10 words of ``counters`` (N, 4) int64 -> (N, 4) int64, on the backend.

    A test hook: the reference and the kernels must agree on these bit for bit.
    """
    if counters.dim() != 2 or counters.shape[1] != 4 or counters.dtype != torch.int64:
        raise ValueError(f"counters: expected an (N, 4) int64 tensor, got {describe(counters)}")
    backend = resolve_backend(counters.device)
    if backend == "reference":
        c = counters & _MASK32
        return torch.stack(
            philox4x32_10_reference(c[:, 0], c[:, 1], c[:, 2], c[:, 3], k0, k1), dim=1
        )
    counters = counters.contiguous()
    out = alloc(tuple(counters.shape), torch.int64, counters.device)
    if backend in ("cpp", "cuda"):
        _cpp.philox_bits_out(out, counters, k0, k1)
        return out
    n = counters.shape[0]
    block = interpret_block_cap() if interpreting() else 256
    _philox_bits_kernel[(triton.cdiv(n, block),)](counters, out, k0, k1, n, BLOCK=block)
    return out
