"""The compiled ops of ``smartgrpo_fast/csrc``: build on first use, cache, load, call.

Backends ``cpp`` (CPU tensors) and ``cuda`` (CUDA tensors) run these. The sources are
compiled with :func:`torch.utils.cpp_extension.load` (ninja and the system C++ compiler; nvcc
for CUDA) into ``<cache>/<name>``, where ``<cache>`` is ``$SMARTGRPO_EXTENSIONS_DIR`` or
``~/.cache/smartgrpo_fast/extensions`` (``$XDG_CACHE_HOME`` honoured) and ``<name>`` carries a
hash of the sources, the flags and the torch/Python/platform versions: an edited source or a
new torch builds anew, an unchanged one is only loaded (a ``built.ok`` stamp marks a complete
build). Deleting the cache directory forces a rebuild.

The libraries register torch operators ``torch.ops.smartgrpo_fast.*_out`` (``TORCH_LIBRARY`` in
``ops_cpu.cpp``; ``bind_cuda.cpp`` adds CUDA kernels to the same ops; their fake kernels are
registered from Python once the library is loaded, see :mod:`smartgrpo_fast.ops._library`).
Each op writes into outputs its caller allocated, so tests can NaN-fill them.

Nothing here runs at import: the first op that resolves the ``cpp`` (or ``cuda``) backend
builds (tens of seconds, once per machine). A failed build — no compiler, no ninja, a compile
error — never raises from an op: ``auto`` falls back to the PyTorch reference and the reason is
logged once (logger ``smartgrpo_fast.ops._cpp``); ``SMARTGRPO_BACKEND=cpp`` then raises a
ValueError that carries it.

Compiler flags: ``-O3 -ffp-contract=off -fno-math-errno``, never ``-ffast-math`` (it would
break NaN propagation and the noise stream) and never ``-march=native`` (a cached build must
run on any CPU of its architecture): the kernels exist twice, for the x86-64 baseline and for
AVX2, and the AVX2 copy is chosen at run time (``SMARTGRPO_CPU_ISA=generic`` forces the
baseline copy; both give the same bits).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from smartgrpo_fast.ops._common import Mode, Param

__all__ = [
    "CPU_ISA_ENV",
    "CSRC_DIR",
    "EXTENSIONS_DIR_ENV",
    "BuildSpec",
    "Extension",
    "build",
    "cache_root",
    "cem_update_out",
    "cpu_extension",
    "cpu_isa",
    "cpu_spec",
    "cuda_extension",
    "cuda_spec",
    "first_error_line",
    "philox_bits_out",
    "philox_normal_out",
    "report",
    "sample_perturb_out",
    "topk_select_out",
    "x0_estimate_out",
]

logger = logging.getLogger(__name__)

#: The C++/CUDA sources, shipped inside the package so that wheels can build them too.
CSRC_DIR = Path(__file__).resolve().parent.parent / "csrc"
#: Environment variable: the root of the build cache (default ~/.cache/smartgrpo_fast/extensions).
EXTENSIONS_DIR_ENV = "SMARTGRPO_EXTENSIONS_DIR"
#: Environment variable read by the C++ ops: ``generic`` runs the baseline (non-AVX2) kernels.
CPU_ISA_ENV = "SMARTGRPO_CPU_ISA"

_LIB_SUFFIX = ".pyd" if os.name == "nt" else ".so"
_STAMP = "built.ok"
_MAX_REASON = 300


@dataclass(frozen=True)
class BuildSpec:
    """What to compile: ``sources`` (compiled) and ``headers`` (hashed), both in CSRC_DIR."""

    prefix: str
    sources: tuple[str, ...]
    headers: tuple[str, ...]
    cflags: tuple[str, ...]
    ldflags: tuple[str, ...] = ()
    cuda_cflags: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """``<prefix>_<16 hex digits>``: the hash of everything that changes the binary."""
        digest = hashlib.sha256()
        for file in (*self.sources, *self.headers):
            digest.update(file.encode() + b"\0" + (CSRC_DIR / file).read_bytes() + b"\0")
        python = f"{sys.version_info.major}.{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
        for part in (
            *self.cflags,
            "|",
            *self.ldflags,
            "|",
            *self.cuda_cflags,
            torch.__version__,
            str(torch.version.cuda),
            python,
            sys.platform,
            platform.machine(),
        ):
            digest.update(part.encode() + b"\0")
        return f"{self.prefix}_{digest.hexdigest()[:16]}"


@dataclass(frozen=True)
class Extension:
    """The outcome of building and loading one library.

    Attributes:
        name: the library's name (see :attr:`BuildSpec.name`); empty if it was never named.
        ok: the library is loaded and its ops are registered.
        reason: why not ``ok``: the first meaningful line of the error; empty when ok.
        path: the loaded shared library.
        seconds: wall time of the build (or of the load, when cached) in this process.
        built: compiled in this process (False: loaded from the cache, or failed).
    """

    name: str
    ok: bool
    reason: str = ""
    path: str = ""
    seconds: float = 0.0
    built: bool = False


def cache_root() -> Path:
    """``$SMARTGRPO_EXTENSIONS_DIR``, else ``$XDG_CACHE_HOME/smartgrpo_fast/extensions``, else
    ``~/.cache/smartgrpo_fast/extensions``."""
    explicit = os.environ.get(EXTENSIONS_DIR_ENV, "").strip()
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or "~/.cache"
    return Path(base).expanduser() / "smartgrpo_fast" / "extensions"


def cpu_spec() -> BuildSpec:
    """The CPU library: the op schemas and their CPU kernels (OpenMP through ATen)."""
    openmp = () if sys.platform == "darwin" else ("-fopenmp",)
    return BuildSpec(
        prefix="smartgrpo_fast_cpu",
        sources=("ops_cpu.cpp", "cpu_kernels.cpp"),
        headers=("philox.h", "cpu_kernels.h", "cpu_kernels.inc"),
        cflags=("-O3", "-fno-fast-math", "-ffp-contract=off", "-fno-math-errno", *openmp),
        ldflags=openmp,
    )


def cuda_spec() -> BuildSpec:
    """The CUDA library: torch-free kernels (ops_cuda.cu) and their binding (bind_cuda.cpp)."""
    return BuildSpec(
        prefix="smartgrpo_fast_cuda",
        sources=("bind_cuda.cpp", "ops_cuda.cu"),
        headers=("philox.h", "ops_cuda.h"),
        cflags=("-O3", "-fno-fast-math"),
        cuda_cflags=("-O3", "--fmad=false"),
    )


_ERROR_LINE = re.compile(r"(\berror\b|not found|no such file|cannot|unable)", re.IGNORECASE)


def first_error_line(err: BaseException) -> str:
    """The line of ``err``'s message that says what went wrong, at most 300 characters.

    A compiler's ``file:line: error: ...`` line when there is one (torch's "Error building
    extension" header is skipped), else the first line naming a missing tool or file, else
    the first non-empty line; the exception type when the message is empty.
    """
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    body = [line for line in lines if not line.startswith("Error building extension")]
    compiler = [line for line in body if re.search(r":\d+(:\d+)?: (fatal )?error:", line)]
    hints = [line for line in body if _ERROR_LINE.search(line)]
    for candidates in (compiler, hints, lines):
        if candidates:
            return candidates[0][:_MAX_REASON]
    return type(err).__name__


def _compile(spec: BuildSpec, build_dir: Path) -> str:
    """Build ``spec`` with torch.utils.cpp_extension.load (ninja) and load it; its path."""
    from torch.utils import cpp_extension

    return cpp_extension.load(
        name=spec.name,
        sources=[str(CSRC_DIR / s) for s in spec.sources],
        extra_cflags=list(spec.cflags),
        extra_ldflags=list(spec.ldflags),
        extra_cuda_cflags=list(spec.cuda_cflags),
        extra_include_paths=[str(CSRC_DIR)],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )


def build(spec: BuildSpec) -> Extension:
    """Load ``spec``'s library from the cache, building it first if needed. Never raises: a
    failure is an :class:`Extension` with ``ok=False`` and the reason."""
    start = time.perf_counter()
    name = ""
    try:
        name = spec.name
        build_dir = cache_root() / name
        library = build_dir / f"{name}{_LIB_SUFFIX}"
        if library.is_file() and (build_dir / _STAMP).is_file():
            torch.ops.load_library(str(library))
            return Extension(name, True, path=str(library), seconds=time.perf_counter() - start)
        build_dir.mkdir(parents=True, exist_ok=True)
        logger.info("smartgrpo_fast: compiling %s (first use; cached in %s)", name, build_dir)
        path = _compile(spec, build_dir)
        (build_dir / _STAMP).write_text(f"{name}\n")
        seconds = time.perf_counter() - start
        return Extension(name, True, path=str(path), seconds=seconds, built=True)
    except Exception as err:  # any failure means: use another backend, say why
        return Extension(name, False, first_error_line(err), seconds=time.perf_counter() - start)


def report(ext: Extension, what: str, fallback: str) -> None:
    """Log the outcome of a build: info on a fresh build, a warning naming ``fallback`` and
    the reason on a failure. The cached accessors below call it once per process."""
    if ext.ok and ext.built:
        logger.info("smartgrpo_fast: built %s in %.1f s (%s)", what, ext.seconds, ext.path)
    elif not ext.ok:
        logger.warning("smartgrpo_fast: %s are unavailable (%s); %s", what, ext.reason, fallback)


@functools.cache
def cpu_extension() -> Extension:
    """The CPU library, built or loaded on the first call of the process (then cached)."""
    ext = build(cpu_spec())
    report(ext, "the C++ CPU ops", "CPU tensors use the PyTorch reference")
    if ext.ok:
        from smartgrpo_fast.ops._library import register_cpp_fakes

        register_cpp_fakes()
    return ext


def _cuda_home() -> str | None:
    """torch's CUDA_HOME (the toolkit nvcc builds with), None when absent or not importable."""
    try:
        from torch.utils import cpp_extension
    except Exception:  # e.g. setuptools missing: then nothing can be built anyway
        return None
    return cpp_extension.CUDA_HOME


@functools.cache
def cuda_extension() -> Extension:
    """The CUDA library (after the CPU one, which defines the op schemas); cached likewise."""
    if torch.version.cuda is None:
        ext = Extension("", False, f"torch {torch.__version__} has no CUDA")
    elif not (cpu := cpu_extension()).ok:
        ext = Extension("", False, f"the C++ CPU library (the op schemas) failed: {cpu.reason}")
    elif (home := _cuda_home()) is None:
        ext = Extension("", False, "nvcc not found (set CUDA_HOME to the CUDA toolkit)")
    else:
        logger.debug("smartgrpo_fast: CUDA toolkit at %s", home)
        ext = build(cuda_spec())
    report(ext, "the CUDA C++ ops", "SMARTGRPO_BACKEND=cuda cannot be used")
    return ext


# --------------------------------------------------------------------------------------
# Calls (arguments validated and normalised by the op functions)
# --------------------------------------------------------------------------------------


def _seed(seed: int | torch.Tensor) -> tuple[torch.Tensor | None, int, int]:
    if isinstance(seed, torch.Tensor):
        return seed, 0, 0
    s = int(seed) % 2**64
    return None, s & 0xFFFFFFFF, s >> 32


def _round(rnd: int | torch.Tensor) -> tuple[torch.Tensor | None, int]:
    if isinstance(rnd, torch.Tensor):
        return rnd, 0
    return None, int(rnd) & 0xFFFFFFFF


def _row_offset(row_offset: int | torch.Tensor) -> tuple[torch.Tensor | None, int]:
    if isinstance(row_offset, torch.Tensor):
        return row_offset, 0
    return None, int(row_offset)


def _param(p: Param) -> tuple[torch.Tensor | None, float]:
    """(tensor, value): None and the float for SCALAR; the (B,) or (B, D) view otherwise."""
    return (None, p.value) if p.mode == Mode.SCALAR else (p.tensor, 0.0)


def sample_perturb_out(
    out: torch.Tensor,
    mean2: torch.Tensor,
    mu: Param,
    sigma: Param,
    scale: Param,
    seed: int | torch.Tensor,
    rnd: int | torch.Tensor,
    row_offset: int | torch.Tensor = 0,
) -> None:
    """Fill ``out`` (B, k, *S), contiguous, with sample_perturb of ``mean2`` (B, D)."""
    torch.ops.smartgrpo_fast.sample_perturb_out(
        out,
        mean2,
        *_param(mu),
        *_param(sigma),
        *_param(scale),
        *_seed(seed),
        *_round(rnd),
        *_row_offset(row_offset),
    )


def x0_estimate_out(
    out: torch.Tensor, z2: torch.Tensor, v2: torch.Tensor, t: Param, scaling: float, shift: float
) -> None:
    """Fill ``out`` (N, D), contiguous, with ``(z2 - t v2) / scaling + shift``."""
    torch.ops.smartgrpo_fast.x0_estimate_out(out, z2, v2, *_param(t), scaling, shift)


def topk_select_out(out: torch.Tensor, rewards: torch.Tensor, t: int) -> None:
    """Fill ``out`` (B, t) int64, contiguous, with the indices of the ``t`` best of each row
    of ``rewards`` (B, K) float32/bfloat16/float16, any strides (topk_select's order)."""
    torch.ops.smartgrpo_fast.topk_select_out(out, rewards, t)


def cem_update_out(
    mu_out: torch.Tensor,
    sigma_out: torch.Tensor,
    mu: Param,
    sigma: Param,
    elite_idx: torch.Tensor,
    *,
    k: int,
    seed: int | torch.Tensor,
    rnd: int | torch.Tensor,
    alpha: float,
    min_sigma: float,
    per_element: bool,
    row_offset: int | torch.Tensor = 0,
    counts: torch.Tensor | None = None,
) -> None:
    """Fill ``mu_out`` (B, *S) and ``sigma_out`` ((B, *S), or (B,) pooled), float32; with
    ``counts`` (B,) int64, row b uses its first ``counts[b]`` elites."""
    torch.ops.smartgrpo_fast.cem_update_out(
        mu_out,
        sigma_out,
        *_param(mu),
        *_param(sigma),
        elite_idx,
        k,
        *_seed(seed),
        *_round(rnd),
        *_row_offset(row_offset),
        alpha,
        min_sigma,
        per_element,
        counts,
    )


def philox_normal_out(
    out: torch.Tensor,
    seed: int | torch.Tensor,
    rnd: int | torch.Tensor,
    row_offset: int | torch.Tensor = 0,
) -> None:
    """Fill ``out`` (B, k, *S) float32, contiguous, with the stream's normals (row b of
    ``out`` is the stream's row ``b + row_offset``)."""
    torch.ops.smartgrpo_fast.philox_normal_out(
        out, *_seed(seed), *_round(rnd), *_row_offset(row_offset)
    )


def philox_bits_out(out: torch.Tensor, counters: torch.Tensor, k0: int, k1: int) -> None:
    """Fill ``out`` (N, 4) int64 with the Philox4x32-10 words of ``counters`` (N, 4) int64."""
    torch.ops.smartgrpo_fast.philox_bits_out(out, counters, k0, k1)


def cpu_isa() -> str:
    """``avx2`` or ``generic``: which copy of the CPU kernels runs (needs the CPU library)."""
    return torch.ops.smartgrpo_fast.cpu_isa()
