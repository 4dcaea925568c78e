"""The compiled ops of smartgrpo_fast/csrc: the C++ CPU backend on the one noise stream (against
the reference and the Triton interpreter), its build, cache and fallback, and the compile checks
of the CUDA sources (nvcc; the CUDA binding against stand-in headers).

The op tests of test_sample_perturb.py, test_cem_update.py, test_x0_estimate.py and
test_philox.py also run on the C++ backend (the ``backend`` fixture); this file adds what is
specific to it: large and odd shapes that cut across blocks, tasks and threads, both kernel
copies (AVX2 and baseline), dtypes and strides the others do not combine, and the build.
"""

from __future__ import annotations

import fnmatch
import glob
import importlib
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import use_backend
from helpers import assert_close

from smartgrpo_fast.ops import (
    _cpp,
    cem_update,
    philox_normal,
    resolve_backend,
    sample_perturb,
    x0_estimate,
)
from smartgrpo_fast.ops._cpp import Extension
from smartgrpo_fast.ops.philox import philox4x32_10_reference, philox_bits

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
#: Max |normal(C++) - normal(reference)| allowed: float32 rounding of log/sqrt/cos/sin.
NORMAL_ATOL = 1e-5


@pytest.fixture
def cpp(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the C++ backend (skip when the extension could not be built here)."""
    use_backend(monkeypatch, "cpp")


# --------------------------------------------------------------------------------------
# The build
# --------------------------------------------------------------------------------------


def test_extension_builds_and_reports_its_time(cpp) -> None:
    ext = _cpp.cpu_extension()
    how = "compiled" if ext.built else "loaded from the cache"
    print(
        f"C++ extension {ext.name}: {how} in {ext.seconds:.1f} s; "
        f"kernels: {_cpp.cpu_isa()}; {ext.path}"
    )
    assert ext.ok and Path(ext.path).is_file()
    assert _cpp.cpu_extension() is ext  # built once per process
    assert resolve_backend(CPU) == "cpp"


def test_a_second_build_loads_from_the_cache(cpp) -> None:
    again = _cpp.build(_cpp.cpu_spec())
    assert again.ok and not again.built
    assert again.path == _cpp.cpu_extension().path


def test_cache_key_changes_with_flags_and_sources() -> None:
    spec = _cpp.cpu_spec()
    other = _cpp.BuildSpec(spec.prefix, spec.sources, spec.headers, (*spec.cflags, "-g"))
    assert spec.name != other.name
    assert spec.name == _cpp.cpu_spec().name
    assert spec.name.startswith("smartgrpo_fast_cpu_") and len(spec.name) == 19 + 16
    assert "-ffast-math" not in spec.cflags and "-march=native" not in spec.cflags
    assert "-ffp-contract=off" in spec.cflags


def test_cache_root_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv(_cpp.EXTENSIONS_DIR_ENV, str(tmp_path / "ext"))
    assert _cpp.cache_root() == tmp_path / "ext"
    monkeypatch.delenv(_cpp.EXTENSIONS_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _cpp.cache_root() == tmp_path / "xdg" / "smartgrpo_fast" / "extensions"


COMPILER_ERROR = (
    "Error building extension 'smartgrpo_fast_cpu_0123456789abcdef': "
    "[1/3] c++ -MMD -MF ops_cpu.o.d -O3 -c ops_cpu.cpp -o ops_cpu.o\n"
    "FAILED: ops_cpu.o\n"
    "c++ -MMD -MF ops_cpu.o.d -O3 -c ops_cpu.cpp -o ops_cpu.o\n"
    "ops_cpu.cpp: In function 'void f()':\n"
    "ops_cpu.cpp:12:5: error: 'foo' was not declared in this scope\n"
    "   12 |     foo();\n"
    "ninja: build stopped: subcommand failed.\n"
)


@pytest.mark.parametrize(
    "message,expected",
    [
        (COMPILER_ERROR, "ops_cpu.cpp:12:5: error: 'foo' was not declared in this scope"),
        (
            "Ninja is required to load C++ extensions (pip install ninja to get it)",
            "Ninja is required to load C++ extensions (pip install ninja to get it)",
        ),
        (
            "Error building extension 'x': [1/2] c++ ...\n/bin/sh: 1: c++: not found\n",
            "/bin/sh: 1: c++: not found",
        ),
        ("", "RuntimeError"),
    ],
)
def test_first_error_line(message: str, expected: str) -> None:
    assert _cpp.first_error_line(RuntimeError(message)) == expected


def test_failed_build_is_an_extension_with_the_reason_logged_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_compile(spec, build_dir):
        raise RuntimeError(COMPILER_ERROR)

    monkeypatch.setenv(_cpp.EXTENSIONS_DIR_ENV, str(tmp_path))  # no cached build to find
    monkeypatch.setattr(_cpp, "_compile", broken_compile)
    ext = _cpp.build(_cpp.cpu_spec())
    assert not ext.ok and not ext.built
    assert ext.reason == "ops_cpu.cpp:12:5: error: 'foo' was not declared in this scope"
    with caplog.at_level(logging.INFO, logger="smartgrpo_fast.ops._cpp"):
        _cpp.report(ext, "the C++ CPU ops", "CPU tensors use the PyTorch reference")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert ext.reason in warnings[0].getMessage()
    assert "PyTorch reference" in warnings[0].getMessage()


def test_auto_falls_back_to_the_reference_and_forcing_cpp_explains(
    monkeypatch: pytest.MonkeyPatch, run_reference
) -> None:
    failed = Extension("smartgrpo_fast_cpu_0", False, "ops_cpu.cpp:1:1: error: boom")
    monkeypatch.setattr(_cpp, "cpu_extension", lambda: failed)
    assert resolve_backend(CPU) == "reference"
    mean = torch.randn(2, 9)
    z = sample_perturb(mean, 0.0, 1.0, 0.5, k=3, seed=4)
    assert torch.equal(z, run_reference(sample_perturb, mean, 0.0, 1.0, 0.5, k=3, seed=4))
    monkeypatch.setenv("SMARTGRPO_BACKEND", "cpp")
    msg = r"^SMARTGRPO_BACKEND=cpp: the C\+\+ extension failed to build: ops_cpu.cpp:1:1: error"
    with pytest.raises(ValueError, match=msg):
        resolve_backend(CPU)
    with pytest.raises(ValueError, match=msg):
        sample_perturb(mean, 0.0, 1.0, 0.5, k=3, seed=4)


@pytest.mark.parametrize(
    "backend,device,match",
    [
        ("cpp", "meta", r"^SMARTGRPO_BACKEND=cpp: the C\+\+ ops run on CPU tensors, got .*meta"),
        ("cuda", "cpu", r"^SMARTGRPO_BACKEND=cuda: "),
        ("fast", "cpu", r"^SMARTGRPO_BACKEND: expected one of auto, reference, cpp, triton, cuda"),
    ],
)
def test_unavailable_backend_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, backend: str, device: str, match: str
) -> None:
    monkeypatch.setenv("SMARTGRPO_BACKEND", backend)
    with pytest.raises(ValueError, match=match):
        resolve_backend(torch.device(device))


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the error without CUDA")
def test_cuda_backend_without_cuda_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMARTGRPO_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"^SMARTGRPO_BACKEND=cuda: torch has no CUDA"):
        resolve_backend(CPU)


@pytest.mark.slow
def test_missing_compiler_falls_back_in_a_fresh_process(tmp_path) -> None:
    """End to end: a compiler that does not exist, an empty cache. Import works, the CPU ops run
    the reference, one warning gives the reason, forcing cpp raises it."""
    script = textwrap.dedent(
        """
        import logging, os
        logging.basicConfig(level=logging.WARNING, format="LOG %(name)s %(message)s")
        import torch
        import smartgrpo_fast
        from smartgrpo_fast.ops import resolve_backend
        mean = torch.zeros(1, 8)
        smartgrpo_fast.sample_perturb(mean, 0.0, 1.0, 1.0, k=2, seed=0)
        smartgrpo_fast.sample_perturb(mean, 0.0, 1.0, 1.0, k=2, seed=1)
        print("auto:", resolve_backend(torch.device("cpu")))
        os.environ["SMARTGRPO_BACKEND"] = "cpp"
        try:
            resolve_backend(torch.device("cpu"))
        except ValueError as err:
            print("forced:", err)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "SMARTGRPO_BACKEND"}
    env |= {"CXX": str(tmp_path / "no-such-c++"), _cpp.EXTENSIONS_DIR_ENV: str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "auto: reference" in proc.stdout
    assert "forced: SMARTGRPO_BACKEND=cpp: the C++ extension failed to build:" in proc.stdout
    ours = [line for line in proc.stderr.splitlines() if line.startswith("LOG smartgrpo_fast")]
    assert len(ours) == 1, proc.stderr
    assert "the C++ CPU ops are unavailable" in ours[0] and "no-such-c++" in ours[0]


# --------------------------------------------------------------------------------------
# One stream: bits and normals against the reference and the Triton interpreter
# --------------------------------------------------------------------------------------


def test_bits_identical_to_reference_and_triton(cpp, monkeypatch) -> None:
    gen = torch.Generator().manual_seed(1)
    counters = torch.randint(0, 2**32, (65536, 4), generator=gen, dtype=torch.int64)
    counters[:4] = torch.tensor([[0] * 4, [2**32 - 1] * 4, [2**32, 2**33 + 5, -1, 7], [1, 2, 3, 4]])
    k0, k1 = 0xDEADBEEF, 0x01234567
    got = philox_bits(counters, k0, k1)
    c = counters & 0xFFFFFFFF
    ref = torch.stack(philox4x32_10_reference(c[:, 0], c[:, 1], c[:, 2], c[:, 3], k0, k1), 1)
    assert torch.equal(got, ref)
    use_backend(monkeypatch, "triton")
    assert torch.equal(philox_bits(counters, k0, k1), got)


def test_normal_max_abs_difference_measured(cpp, run_reference, monkeypatch) -> None:
    """The figure quoted in docs/noise-stream.md.

    max |C++ - reference| and |C++ - Triton| over 2**20 normals.
    """
    shape = (4, 16, 16384)
    n = philox_normal(shape, seed=7, round=1)
    ref = run_reference(philox_normal, shape, seed=7, round=1)
    use_backend(monkeypatch, "triton")
    tri = philox_normal(shape, seed=7, round=1)
    d_ref = float((n - ref).abs().max())
    d_tri = float((n - tri).abs().max())
    print(
        f"max |n_cpp - n_reference| = {d_ref:.3g}, max |n_cpp - n_triton| = {d_tri:.3g} "
        f"over {n.numel()} normals ({_cpp.cpu_isa()} kernels)"
    )
    assert d_ref <= NORMAL_ATOL and d_tri <= NORMAL_ATOL
    assert bool(torch.isfinite(n).all())


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 3, 5), (1, 2, 1023), (1, 1, 1025), (3, 2, 4099)])
def test_normals_against_reference_at_block_edges(cpp, run_reference, shape) -> None:
    n = philox_normal(shape, seed=2**63 + 11, round=2**32 - 1)
    ref = run_reference(philox_normal, shape, seed=2**63 + 11, round=2**32 - 1)
    assert_close(n, ref, atol=NORMAL_ATOL, rtol=0, name="n")


def test_both_kernel_copies_give_the_same_bits(cpp, monkeypatch) -> None:
    """The AVX2 copy and the baseline copy of the kernels (SMARTGRPO_CPU_ISA=generic)."""
    if _cpp.cpu_isa() != "avx2":
        pytest.skip("this CPU runs the baseline kernels only: nothing to compare")
    gen = torch.Generator().manual_seed(3)
    b, s, k = 2, (3, 700), 5
    mean = torch.randn(b, *s, generator=gen).half()
    mu = torch.randn(b, *s, generator=gen).bfloat16()
    sigma = (torch.rand(b, *s, generator=gen) + 0.5).half()
    idx = torch.tensor([[4, 0, 2], [1, 3, 0]])

    def run() -> list[torch.Tensor]:
        z = sample_perturb(mean, mu, sigma, torch.tensor([0.3, 2.0]), k=k, seed=9, round=1)
        cem = cem_update(mu, sigma, idx, shape=(b, *s), k=k, seed=9, round=1, alpha=0.6)
        pooled = cem_update(0.1, 0.9, idx, shape=(b, *s), k=k, seed=9, round=1, per_element=False)
        x0 = x0_estimate(z.flatten(0, 1), z.flatten(0, 1).bfloat16(), 0.7, scaling=1.53)
        n = philox_normal((b, k, *s), seed=9, round=1)
        return [z, *cem, *pooled, x0, n]

    fast = run()
    monkeypatch.setenv(_cpp.CPU_ISA_ENV, "generic")
    assert _cpp.cpu_isa() == "generic"
    for got, expected in zip(run(), fast, strict=True):
        assert torch.equal(got, expected)


# --------------------------------------------------------------------------------------
# The ops at shapes that cut across blocks (1024 elements), tasks and threads
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "b,s,k",
    [
        (3, (2051,), 5),  # three blocks, the last one short; D odd
        (1, (7,), 40),  # one short block: candidates split across tasks
        (2, (16, 40, 40), 4),  # 25 full blocks per row
        (5, (3, 1, 5), 1),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sample_perturb_large_and_odd_shapes(cpp, run_reference, b, s, k, dtype) -> None:
    gen = torch.Generator().manual_seed(5)
    mean = torch.randn(b, *s, generator=gen).to(dtype)
    mu = 0.1 * torch.randn(b, *s, generator=gen)
    sigma = torch.rand(b, generator=gen) + 0.5
    z = sample_perturb(mean, mu, sigma, 0.7, k=k, seed=21, round=3)
    ref = run_reference(sample_perturb, mean, mu, sigma, 0.7, k=k, seed=21, round=3)
    assert_close(z, ref, name="z")


def test_results_do_not_depend_on_the_thread_count(cpp) -> None:
    mean = torch.randn(2, 3000)
    idx = torch.tensor([[0, 5, 2], [7, 1, 3]])
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            z = sample_perturb(mean, 0.1, 0.9, 0.5, k=9, seed=1)
            mu, sigma = cem_update(0.1, 0.9, idx, shape=(2, 3000), k=9, seed=1, round=0)
            pooled = cem_update(0.1, 0.9, idx, shape=(2, 3000), k=9, seed=1, round=0,
                                per_element=False)  # fmt: skip
            outs.append((z, mu, sigma, *pooled))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)


def test_strided_broadcast_and_mixed_dtype_parameters(cpp, run_reference) -> None:
    gen = torch.Generator().manual_seed(6)
    b, s = 3, (5, 410)
    mean = torch.randn(1, *s, generator=gen).bfloat16().expand(b, *s)  # stride-0 rows
    mu = torch.randn(b, s[1], s[0], generator=gen).half().transpose(1, 2)  # non-contiguous
    sigma = (torch.rand(s[1], generator=gen) + 0.2).bfloat16()  # broadcasts over rows
    scale = torch.tensor(0.4, dtype=torch.float64)  # 0-d float64: one value for all rows
    args = (mean, mu, sigma, scale)
    z = sample_perturb(*args, k=3, seed=77, round=torch.tensor(5))
    assert_close(z, run_reference(sample_perturb, *args, k=3, seed=77, round=5), name="z")
    mu_row = torch.randn(2 * b, generator=gen, dtype=torch.float64)[::2]  # strided float64 rows
    z = sample_perturb(mean, mu_row, 0.5, scale, k=2, seed=torch.tensor(-3), round=0)
    ref = run_reference(sample_perturb, mean, mu_row, 0.5, scale, k=2, seed=2**64 - 3)
    assert_close(z, ref, name="z, float64 rows")


@pytest.mark.parametrize("per_element", [True, False])
@pytest.mark.parametrize("counts,row_offset", [(None, 0), ([0, 1, 3], 4)])
def test_cem_update_across_blocks(cpp, run_reference, per_element, counts, row_offset) -> None:
    gen = torch.Generator().manual_seed(8)
    b, s, k = 3, (2, 1500), 12
    mu = (0.1 * torch.randn(b, *s, generator=gen)).bfloat16()
    sigma = torch.rand(b, *s, generator=gen) + 0.5 if per_element else torch.rand(b) + 0.5
    idx = torch.stack([torch.randperm(k, generator=gen)[:5] for _ in range(b)]).int()[:, ::2]
    counts = None if counts is None else torch.tensor(counts)
    kw = dict(shape=(b, *s), k=k, seed=3, round=9, alpha=0.8, min_sigma=0.3, counts=counts,
              row_offset=row_offset)  # fmt: skip
    got = cem_update(mu, sigma, idx, per_element=per_element, **kw)
    ref = run_reference(cem_update, mu, sigma, idx.long(), per_element=per_element, **kw)
    assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5, name="mu_new")
    assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5, name="sigma_new")


def test_cem_update_bad_index_across_blocks_gives_a_nan_row(cpp) -> None:
    idx = torch.tensor([[0, 1], [2, -1], [3, 0]])
    for per_element in (True, False):
        mu, sigma = cem_update(0.0, 1.0, idx, shape=(3, 2500), k=4, seed=0, round=0,
                               per_element=per_element, validate=False)  # fmt: skip
        assert torch.isnan(mu[1]).all() and torch.isnan(sigma[1]).all()
        assert torch.isfinite(mu[[0, 2]]).all() and torch.isfinite(sigma[[0, 2]]).all()


def test_x0_estimate_mixed_dtypes_and_strides(cpp, run_reference) -> None:
    gen = torch.Generator().manual_seed(9)
    z = torch.randn(6, 1100, 3, generator=gen).half().transpose(1, 2)
    v = torch.randn(6, 3, 1100, generator=gen).bfloat16()
    t = torch.rand(12, generator=gen, dtype=torch.float64)[::2]
    x0 = x0_estimate(z, v, t, scaling=1.5305, shift=0.0609)
    assert x0.dtype == torch.float32
    ref = run_reference(x0_estimate, z, v, t, scaling=1.5305, shift=0.0609)
    assert_close(x0, ref, name="x0")


def test_x0_estimate_autograd_runs_the_cpp_forward(cpp, monkeypatch) -> None:
    calls = []
    real = _cpp.x0_estimate_out
    monkeypatch.setattr(_cpp, "x0_estimate_out", lambda *a: calls.append(1) or real(*a))
    z = torch.randn(4, 10, requires_grad=True)
    v = torch.randn(4, 10)
    x0 = x0_estimate(z, v, 0.5, scaling=2.0)
    x0.sum().backward()
    assert calls == [1]
    assert_close(z.grad, torch.full((4, 10), 0.5), atol=0, rtol=0, name="grad z")


def test_outputs_come_from_alloc(cpp, monkeypatch) -> None:
    """The C++ ops write into tensors the Python side allocated (and the tests NaN-fill)."""
    # importlib: the package re-exports each op under its module's name.
    sp_module = importlib.import_module("smartgrpo_fast.ops.sample_perturb")
    cem_module = importlib.import_module("smartgrpo_fast.ops.cem_update")
    made: list[torch.Tensor] = []

    def recording_alloc(shape, dtype, device):
        made.append(torch.full(shape, float("nan"), dtype=dtype, device=device))
        return made[-1]

    monkeypatch.setattr(sp_module, "alloc", recording_alloc)
    monkeypatch.setattr(cem_module, "alloc", recording_alloc)
    z = sample_perturb(torch.zeros(2, 33), 0.0, 1.0, 1.0, k=3, seed=0)
    assert z is made[0] and not torch.isnan(z).any()
    mu, sigma = cem_update(0.0, 1.0, torch.tensor([[0], [2]]), shape=(2, 33), k=3, seed=0, round=0)
    assert mu is made[1] and sigma is made[2]


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: sample_perturb(torch.zeros(2, 3), 0.0, -1.0, 1.0, k=2, seed=0), ValueError,
         r"^sigma: expected a value >= 0"),
        (lambda: sample_perturb(torch.zeros(2, 3), 0.0, 1.0, 1.0, k=0, seed=0), ValueError,
         r"^k: expected an int >= 1"),
        (lambda: sample_perturb(torch.zeros(2, 3), 0.0, 1.0, 1.0, k=2, seed=0,
                                round=torch.tensor(2**32)), ValueError, r"^round: expected"),
        (lambda: cem_update(0.0, 1.0, torch.tensor([[0, 9]]), shape=(1, 3), k=4, seed=0,
                            round=0), ValueError, r"^elite_idx: expected indices in \[0, 4\)"),
        (lambda: x0_estimate(torch.zeros(2, 3), torch.zeros(2, 3), 0.5, scaling=0.0),
         ValueError, r"^scaling: expected a non-zero number"),
        (lambda: philox_normal((1, 2**32), seed=0), ValueError, r"^k: the noise stream"),
    ],
)  # fmt: skip
def test_validation_still_applies(cpp, call, exc, match) -> None:
    with pytest.raises(exc, match=match):
        call()


# --------------------------------------------------------------------------------------
# The CUDA sources: plain nvcc, and the binding's registration against the schemas
# --------------------------------------------------------------------------------------


def _find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    candidates = sorted(glob.glob("/usr/local/cuda*/bin/nvcc"))
    return candidates[-1] if candidates else None


def test_cuda_sources_are_torch_free() -> None:
    for name in (*(p.name for p in _cpp.CSRC_DIR.glob("*.cu")), "ops_cuda.h", "philox.h"):
        text = (_cpp.CSRC_DIR / name).read_text()
        for header in ("<torch/", "<ATen/", "<c10/"):
            assert header not in text, f"{name} includes {header}: keep it torch-free"


@pytest.mark.slow
@pytest.mark.parametrize("cu", sorted(p.name for p in _cpp.CSRC_DIR.glob("*.cu")))
def test_cuda_source_compiles_with_nvcc_for_sm80_and_sm90(cu: str, tmp_path) -> None:
    nvcc = _find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (on PATH, in CUDA_HOME or /usr/local/cuda*): no CUDA toolkit")
    cmd = [
        nvcc,
        "-std=c++17",
        "-O3",
        "--fmad=false",
        # what torch.utils.cpp_extension adds when it builds the CUDA library
        "-D__CUDA_NO_HALF_OPERATORS__",
        "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__",
        "--expt-relaxed-constexpr",
        "--compiler-options=-fPIC",
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        f"-I{_cpp.CSRC_DIR}",
        "-c",
        str(_cpp.CSRC_DIR / cu),
        "-o",
        str(tmp_path / "out.o"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, " ".join(cmd) + "\n" + proc.stdout + proc.stderr
    assert (tmp_path / "out.o").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.skipif(torch.version.cuda is not None, reason="torch has CUDA: test_cuda.py runs it")
def test_cuda_binding_registers_against_the_schemas(cpp, tmp_path) -> None:
    """bind_cuda.cpp needs torch's CUDA headers, which CPU wheels cannot compile: build it here
    against stand-ins (tests/cuda_stubs) and check its kernels register for the CUDA key with
    the signatures of ops_cpu.cpp's schemas (a mismatch fails at registration)."""
    from torch.utils import cpp_extension

    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        pytest.skip("no C++ compiler")
    stubs = ROOT / "tests" / "cuda_stubs"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [
        compiler,
        "-std=c++20",
        "-O0",
        "-shared",
        "-fPIC",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        f"-I{stubs}",
        f"-I{_cpp.CSRC_DIR}",
        *(f"-I{p}" for p in cpp_extension.include_paths()),
        str(_cpp.CSRC_DIR / "bind_cuda.cpp"),
        str(stubs / "launchers.cpp"),
        *(f"-L{p}" for p in cpp_extension.library_paths()),
        "-lc10",
        "-ltorch_cpu",
        "-o",
        str(tmp_path / "bind_stub.so"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    script = textwrap.dedent(
        """
        import sys, torch
        from smartgrpo_fast.ops import _cpp
        assert _cpp.cpu_extension().ok
        torch.ops.load_library(sys.argv[1])
        for op in ("philox_bits_out", "philox_normal_out", "sample_perturb_out",
                   "cem_update_out", "x0_estimate_out"):
            dump = torch._C._dispatch_dump("smartgrpo_fast::" + op)
            print(op, "CUDA: registered" in dump)
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "bind_stub.so")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.split() == [
        "philox_bits_out", "True", "philox_normal_out", "True", "sample_perturb_out", "True",
        "cem_update_out", "True", "x0_estimate_out", "False",
    ]  # fmt: skip


def test_package_data_ships_every_source() -> None:
    """A wheel must carry smartgrpo_fast/csrc: every file there matches a package-data glob."""
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["smartgrpo_fast"]
    for path in sorted(_cpp.CSRC_DIR.iterdir()):
        rel = f"csrc/{path.name}"
        assert any(fnmatch.fnmatch(rel, p) for p in patterns), f"{rel} is not package data"
