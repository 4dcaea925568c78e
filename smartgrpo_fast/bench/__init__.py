"""Benchmarks of smartgrpo_fast, runnable from the command line (``smartgrpo-fast bench``).

:mod:`smartgrpo_fast.bench.ops` times each fused op on each backend (C++, PyTorch reference,
Triton, CUDA C++) against the unfused PyTorch composition a user would write, and writes one
row per measurement to CSV and JSON, a plot drawn from that CSV, and a table for the terminal.
The pytest-benchmark suite in ``benchmarks/`` builds its cases with the same functions.
"""

from smartgrpo_fast.bench.ops import (
    CPU_PROVIDERS,
    CUDA_PROVIDERS,
    OPS,
    PROVIDERS,
    CaseShape,
    OpCase,
    OpsBenchConfig,
    build_case,
    case_shape,
    format_table,
    plot_csv,
    provider_problem,
    read_csv,
    run_ops_bench,
    write_csv,
    write_json,
)

__all__ = [
    "CPU_PROVIDERS",
    "CUDA_PROVIDERS",
    "OPS",
    "PROVIDERS",
    "CaseShape",
    "OpCase",
    "OpsBenchConfig",
    "build_case",
    "case_shape",
    "format_table",
    "plot_csv",
    "provider_problem",
    "read_csv",
    "run_ops_bench",
    "write_csv",
    "write_json",
]
