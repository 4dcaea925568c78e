"""pytest-benchmark suite of the fused ops against unfused PyTorch, on the engine's cases.

    python -m pytest benchmarks --benchmark-only            # timings, grouped by op and size
    python -m pytest benchmarks -q --benchmark-disable      # smoke run: each case once

Each test times one (op, provider, size) case of :func:`smartgrpo_fast.bench.op_cases.build_case`
as complete calls (on CUDA each call ends with a synchronize), the backend providers (cpp,
reference, triton, cuda) with ``SMARTGRPO_BACKEND`` set to them; a provider that cannot run on
the device (triton or cuda on CPU, cpp without a compiler) is skipped with the reason.
``extra_info`` holds the elements, shape, the fused op's minimum bytes and the GB/s at the
median time. The ``smartgrpo-fast bench ops`` command is the reference measurement (CUDA
events, L2 flushed, CSV/JSON/plot); this suite plugs the same cases into pytest-benchmark's
tooling (``--benchmark-compare``, ``--benchmark-json``, histograms).
"""

from __future__ import annotations

import pytest
import torch

from smartgrpo_fast.bench.op_cases import OPS, PROVIDERS, build_case, provider_problem
from smartgrpo_fast.bench.runinfo import device_name


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op", OPS)
def test_bench_op(
    benchmark,
    op: str,
    provider: str,
    size: int,
    bench_device: torch.device,
    bench_dtype: torch.dtype,
) -> None:
    problem = provider_problem(provider, bench_device)
    if problem is not None:
        pytest.skip(problem)
    case = build_case(op, provider, size, dtype=bench_dtype, device=bench_device, seed=0)
    dtype_name = str(case.dtype).removeprefix("torch.")
    benchmark.group = f"{op} K*D={case.shape.elements} {dtype_name}"
    benchmark.extra_info.update(
        op=op,
        provider=provider,
        elements=case.shape.elements,
        shape=case.shape.label,
        dtype=dtype_name,
        min_bytes=case.min_bytes,
        device_name=device_name(bench_device),
    )
    with torch.no_grad():
        if benchmark.enabled:
            case.run()  # warm-up: compiles the Triton kernels on CUDA
        out = benchmark(case.run)
    assert out is not None
    if benchmark.stats is not None:
        median_s = benchmark.stats.stats.median
        benchmark.extra_info["gbps"] = case.min_bytes / median_s / 1e9 if median_s > 0 else None
