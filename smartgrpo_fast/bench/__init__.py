"""Benchmarks of smartgrpo_fast, runnable from the command line (``smartgrpo-fast bench``).

A small framework that every suite shares:

* :mod:`~smartgrpo_fast.bench.timing`: warm-up, timed calls (CUDA events or
  ``time.perf_counter``), quantiles;
* :mod:`~smartgrpo_fast.bench.runinfo`: the machine, torch, this package and its commit;
* :mod:`~smartgrpo_fast.bench.case`: what is timed (a callable, its shape, device and dtype);
* :mod:`~smartgrpo_fast.bench.rows`: one row per measurement in one schema, CSV and JSON files;
* :mod:`~smartgrpo_fast.bench.report`: progress, text tables and figures.

The suites: :mod:`~smartgrpo_fast.bench.ops` times each fused op on each backend (C++, PyTorch
reference, Triton, CUDA C++) against the unfused PyTorch composition a user would write, on the
cases of :mod:`~smartgrpo_fast.bench.op_cases`, and writes one row per measurement to CSV and
JSON, a plot drawn from that CSV, and a table for the terminal;
:mod:`~smartgrpo_fast.bench.velocity` times the batched velocity,
:mod:`~smartgrpo_fast.bench.search` one whole noise search and
:mod:`~smartgrpo_fast.bench.train` GRPO steps. The pytest-benchmark suite in ``benchmarks/``
builds its cases with the same functions.
"""

from smartgrpo_fast.bench.case import CaseShape, OpCase
from smartgrpo_fast.bench.op_cases import OPS, PROVIDERS, build_case, case_shape, provider_problem
from smartgrpo_fast.bench.ops import (
    CPU_PROVIDERS,
    CUDA_PROVIDERS,
    OpsBenchConfig,
    format_table,
    plot_csv,
    run_ops_bench,
)
from smartgrpo_fast.bench.rows import read_csv, write_csv, write_json

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
