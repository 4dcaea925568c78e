"""Benchmark of the four fused ops against the unfused PyTorch composition a user would write.

Each (op, provider, size) case of :mod:`smartgrpo_fast.bench.op_cases` (the providers, the
shapes and the minimum bytes of each op are described there) is timed by
:func:`smartgrpo_fast.bench.timing.measure` with ``SMARTGRPO_BACKEND`` set to its provider.

Defaults: ``cpp``, ``reference`` and ``unfused`` on CPU (the reference's Philox4x32-10 runs in
int64 tensor arithmetic and loses to ``torch.randn``; the C++ ops are the fast CPU path);
``triton``, ``cuda`` and ``unfused`` on CUDA. A default provider that cannot run on the machine
(e.g. no compiler for ``cpp``) is left out with a note; see :func:`provider_problem`.

Modes
-----
Every row says how it was timed in its ``mode`` column:

* ``eager``: one public call at a time, as a Python caller pays it: on CUDA the device is
  synchronised and the L2 cache flushed before each call, and CUDA events bracket the call's
  host work and its kernels (``measure(..., sync_each=True)``); on CPU ``time.perf_counter``.
* ``kernel`` (CUDA only): the kernels alone: 100 calls captured in one CUDA graph and replayed
  between CUDA events, the L2 flush outside the timed interval (:func:`measure_graph`; calls
  after the first of a replay find inputs that fit the L2 cache in it).
* ``host``: microseconds of host time a call on a tiny case (:data:`HOST_SHAPE`, B = 1, K = 4,
  S = (4, 8, 8)), against one ``torch.add`` of the (1, 4, 4, 8, 8) tensor (row op
  ``torch.add``): what the library costs a caller beyond the kernel (:func:`measure_host`). On
  CPU it includes the (tiny) compute.

Metrics
-------
Each (op, provider, size, mode) of ``eager`` and ``kernel`` gives a ``time`` row (ms: median,
p20, p80 over the timed calls) and a ``bandwidth`` row (GB/s). Bandwidth is the *minimum* bytes
the fused op must move divided by the time, for every provider, so they are comparable: e.g.
sample_perturb reads mean, mu and sigma (D each) and writes the K·D candidates; the unfused
composition moves more than that and its GB/s is an effective, not a physical, figure. Each
(op, size, mode) also gives ``speedup`` rows, all from the one run: for every backend provider
``p``, ``unfused/p`` and (when ``reference`` ran) ``reference/p``, median time ratios with p20 =
baseline p20 / p's p80 and p80 = baseline p80 / p's p20 as conservative bounds. The ``host``
mode gives a ``time`` row in µs per (op, provider), one for ``torch.add``, and a ``ratio`` row
per (op, provider): its time over torch.add's (unit ``x torch.add``). Rows go to CSV and JSON
through :mod:`smartgrpo_fast.bench.rows`; :func:`format_table` and :func:`plot_csv` show them.

The names of the benchmark framework that the other suites share (timing, run metadata, rows
and files) are importable from here too, as they were before it was split out.
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch

from smartgrpo_fast.bench.case import DTYPES, CaseShape, OpCase, forced_backend, parse_device
from smartgrpo_fast.bench.op_cases import (
    BACKEND_PROVIDERS,
    HOST_SHAPE,
    MIN_SIZE,
    OPS,
    PROVIDERS,
    build_case,
    build_host_case,
    case_shape,
    host_baseline,
    provider_problem,
)
from smartgrpo_fast.bench.report import (
    align_columns,
    fmt_number,
    in_order,
    new_figure,
    run_caption,
    save_figure,
    with_progress,
)
from smartgrpo_fast.bench.rows import (
    CSV_FIELDS,
    measurement_rows,
    ordered_row,
    ratio_row,
    read_csv,
    write_csv,
    write_json,
)
from smartgrpo_fast.bench.runinfo import RunInfo, collect_run_info, device_name, git_commit
from smartgrpo_fast.bench.timing import (
    Timing,
    measure,
    measure_graph,
    measure_host,
    quantile,
    summarize,
)

__all__ = [
    "BACKEND_PROVIDERS",
    "BASELINES",
    "CPU_PROVIDERS",
    "CPU_SIZES",
    "CSV_FIELDS",
    "CUDA_PROVIDERS",
    "CUDA_SIZES",
    "DTYPES",
    "HOST_SHAPE",
    "MIN_SIZE",
    "MODES",
    "OPS",
    "PROVIDERS",
    "CaseShape",
    "OpCase",
    "OpsBenchConfig",
    "RunInfo",
    "Timing",
    "build_case",
    "case_shape",
    "collect_run_info",
    "device_name",
    "forced_backend",
    "format_host_table",
    "format_table",
    "git_commit",
    "host_rows",
    "measure",
    "measure_graph",
    "measure_host",
    "measurement_rows",
    "parse_device",
    "plot_csv",
    "provider_problem",
    "quantile",
    "ratio_row",
    "read_csv",
    "run_ops_bench",
    "speedup_rows",
    "summarize",
    "write_csv",
    "write_json",
]

#: Default providers on CPU and on CUDA.
CPU_PROVIDERS: tuple[str, ...] = ("cpp", "reference", "unfused")
CUDA_PROVIDERS: tuple[str, ...] = ("triton", "cuda", "unfused")
#: The providers that speedups are taken against (``<baseline>/<provider>``), when they ran.
BASELINES: tuple[str, ...] = ("unfused", "reference")
#: How a row was timed (its ``mode`` column): see the module docstring.
MODES: tuple[str, ...] = ("eager", "kernel", "host")
#: Default sizes K·D on CPU and on CUDA.
CPU_SIZES: tuple[int, ...] = (2**16, 2**18, 2**20, 2**22, 2**24)
CUDA_SIZES: tuple[int, ...] = (2**20, 2**22, 2**24, 2**26)


@dataclass(frozen=True)
class OpsBenchConfig:
    """What the ops benchmark runs and how; :meth:`for_device` gives per-device defaults.

    Attributes:
        ops: op names from :data:`OPS`, in run order.
        providers: names from :data:`PROVIDERS`, in run order (no repeats).
        sizes: element counts K·D, each >= 256; see :func:`case_shape`.
        dtype: storage dtype of the latents: ``float32``, ``bfloat16`` or ``float16``.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        repeats: timed calls per measurement (>= 1).
        warmup: untimed calls before them (>= 0); on CUDA they also compile the kernels.
        seed: seed of the inputs and of the ops' noise stream, in [0, 2**63).
        validate: call the fused ops with ``validate=True`` (value checks that read the inputs
            and synchronise a CUDA stream) instead of the hot loop's ``validate=False``.
        kernel: on CUDA, also time the kernels alone (mode ``kernel``: ``graph_calls`` calls in
            one CUDA graph, replayed ``max(3, repeats // 10)`` times); ignored on CPU.
        host: also time the host case of every (op, provider) (mode ``host``).
        graph_calls: calls captured in the ``kernel`` mode's graph (>= 1).
    """

    ops: tuple[str, ...] = OPS
    providers: tuple[str, ...] = CPU_PROVIDERS
    sizes: tuple[int, ...] = CPU_SIZES
    dtype: str = "float32"
    device: str = "cpu"
    repeats: int = 10
    warmup: int = 2
    seed: int = 0
    validate: bool = False
    kernel: bool = True
    host: bool = True
    graph_calls: int = 100

    def __post_init__(self) -> None:
        object.__setattr__(self, "ops", tuple(self.ops))
        object.__setattr__(self, "providers", tuple(self.providers))
        object.__setattr__(self, "sizes", tuple(self.sizes))
        if not self.ops:
            raise ValueError("ops: expected at least one op")
        for op in self.ops:
            if op not in OPS:
                raise ValueError(f"ops: expected names from {', '.join(OPS)}, got {op!r}")
        if not self.providers:
            raise ValueError("providers: expected at least one provider")
        for provider in self.providers:
            if provider not in PROVIDERS:
                raise ValueError(
                    f"providers: expected names from {', '.join(PROVIDERS)}, got {provider!r}"
                )
        if len(set(self.providers)) != len(self.providers):
            raise ValueError(f"providers: expected no repeats, got {self.providers}")
        if not self.sizes:
            raise ValueError("sizes: expected at least one size")
        for size in self.sizes:
            if isinstance(size, bool) or not isinstance(size, int) or size < MIN_SIZE:
                raise ValueError(f"sizes: expected ints >= {MIN_SIZE} (K·D elements), got {size!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        parse_device(self.device)
        for name, lo in (("repeats", 1), ("warmup", 0), ("seed", 0), ("graph_calls", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name}: expected an int >= {lo}, got {value!r}")
        if self.seed >= 2**63:
            raise ValueError(f"seed: expected an int < 2**63, got {self.seed}")

    @classmethod
    def for_device(cls, device: str, **overrides: Any) -> OpsBenchConfig:
        """Defaults for ``device``, then ``overrides`` (fields set to None are ignored).

        CPU: providers cpp, reference, unfused; sizes 64K to 16M; 10 repeats, 2 warm-ups.
        CUDA: providers triton, cuda, unfused; sizes 1M, 4M, 16M, 64M; 100 repeats, 10
        warm-ups. The default providers are not checked here: see :func:`provider_problem`.
        """
        on_cuda = parse_device(device).type == "cuda"
        defaults: dict[str, Any] = {
            "device": device,
            "providers": CUDA_PROVIDERS if on_cuda else CPU_PROVIDERS,
            "sizes": CUDA_SIZES if on_cuda else CPU_SIZES,
            "repeats": 100 if on_cuda else 10,
            "warmup": 10 if on_cuda else 2,
        }
        known = {f.name for f in fields(cls)}
        for name, value in overrides.items():
            if name not in known:
                raise TypeError(f"{name}: not a field of {cls.__name__}")
            if value is not None:
                defaults[name] = value
        return cls(**defaults)


def speedup_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """``speedup`` rows from the ``time`` rows of one run: for each (op, x, dtype, mode), each
    baseline of :data:`BASELINES` that ran and each other backend provider ``p`` that ran, a row
    on provider ``p`` with unit ``<baseline>/<p>``: the median time ratio (> 1: ``p`` is faster),
    p20/p80 as conservative bounds. Rows follow the order of the time rows, baselines in
    :data:`BASELINES` order."""
    times = {
        (r["op"], r["x"], r["dtype"], r["mode"], r["provider"]): r
        for r in rows
        if r["metric"] == "time" and r["mode"] != "host"
    }
    out = []
    for baseline in BASELINES:
        for (op, x, dtype, mode, provider), row in times.items():
            base = times.get((op, x, dtype, mode, baseline))
            if provider in ("unfused", baseline) or base is None:
                continue
            out.append(ordered_row(ratio_row(row, base, f"{baseline}/{provider}")))
    return out


class _Job(NamedTuple):
    op: str
    size: int
    provider: str

    def describe(self) -> str:
        return f"{self.op} {self.provider} x={self.size}"


def run_ops_bench(config: OpsBenchConfig, *, progress: bool = True) -> list[dict]:
    """Measure every (op, size, provider) of ``config``; return the rows (see CSV_FIELDS).

    Rows come op by op, size by size, provider by provider (time and bandwidth rows, ``eager``
    then, on CUDA, ``kernel``), then the ``host`` rows, then the speedup rows of all (op, size,
    mode) at the end. Each backend provider is timed with ``SMARTGRPO_BACKEND`` set to it; a
    provider that cannot run here is a ValueError (see :func:`provider_problem`), raised before
    anything is timed. Progress goes to stderr unless ``progress`` is False. A ``kernel``
    measurement whose capture fails is left out with a note on stderr.
    """
    device = parse_device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {config.device!r} requested but CUDA is not available")
    for provider in config.providers:
        problem = provider_problem(provider, device)
        if problem is not None:
            raise ValueError(f"providers: {provider} cannot run on {device}: {problem}")
    info = collect_run_info(device)
    dtype = DTYPES[config.dtype]
    kernel = config.kernel and device.type == "cuda"
    jobs = [
        _Job(op, size, p) for op in config.ops for size in config.sizes for p in config.providers
    ]
    rows: list[dict] = []
    for job in with_progress(jobs, _Job.describe, desc="bench ops", enabled=progress):
        case = build_case(
            job.op,
            job.provider,
            job.size,
            dtype=dtype,
            device=device,
            seed=config.seed,
            validate=config.validate,
        )
        with forced_backend(case.backend):
            timing = measure(
                case.fn, device, warmup=config.warmup, repeats=config.repeats, sync_each=True
            )
            rows += measurement_rows(case, timing, info, config.repeats, mode="eager")
            if kernel:
                replays = max(3, config.repeats // 10)
                try:
                    graphed = measure_graph(
                        case.fn, device, calls=config.graph_calls, replays=replays
                    )
                except Exception as err:  # report, keep the other measurements
                    print(f"note: {job.describe()}: no kernel time, capture failed: {err}",
                          file=sys.stderr)  # fmt: skip
                else:
                    rows += measurement_rows(case, graphed, info, replays, mode="kernel")
    if config.host:
        rows += host_rows(config, info)
    return rows + speedup_rows(rows)


def host_rows(config: OpsBenchConfig, info: RunInfo) -> list[dict]:
    """The ``host`` rows of ``config``: µs a call of each (op, provider) on the host case and of
    one ``torch.add`` (op ``torch.add``, provider ``unfused``: every sample taken), and each
    one's ratio to the ``torch.add`` timed just before it (so that a busy machine slows both
    sides of a ratio alike)."""
    device = parse_device(config.device)
    dtype = DTYPES[config.dtype]
    add_case = OpCase("torch.add", "unfused", HOST_SHAPE, dtype, device,
                      host_baseline(dtype, device), 0)  # fmt: skip
    rows, add_samples = [], []
    for op in config.ops:
        for provider in config.providers:
            case = build_host_case(op, provider, dtype=dtype, device=device, seed=config.seed)
            add = measure_host(add_case.fn, device)
            add_samples += add.samples
            with forced_backend(case.backend):
                timing = measure_host(case.fn, device)
            rows.append(_host_row(case, timing, info, "time", "us"))
            rows.append(_host_row(case, _ratio_timing(timing, add), info, "ratio", "x torch.add"))
    return [_host_row(add_case, summarize(add_samples), info, "time", "us"), *rows]


def _ratio_timing(timing: Timing, base: Timing) -> Timing:
    """``timing`` over ``base``: median ratio, p20/p80 as conservative bounds."""
    return Timing(
        median=timing.median / base.median,
        p20=timing.p20 / base.p80,
        p80=timing.p80 / base.p20,
        samples=timing.samples,
    )


def _host_row(case: OpCase, timing: Timing, info: RunInfo, metric: str, unit: str) -> dict:
    row = measurement_rows(case, timing, info, len(timing.samples), mode="host")[0]
    return ordered_row(row | {"metric": metric, "unit": unit})


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A text table: one line per (op, size, dtype, mode) of the ``eager`` and ``kernel`` rows
    with each provider's median time, every speedup of the run (``<baseline>/<provider>``) and
    each provider's effective GB/s; then, when the run has ``host`` rows, the host table
    (:func:`format_host_table`)."""
    timed = [r for r in rows if r["mode"] != "host"]
    index = {(r["op"], r["x"], r["dtype"], r["mode"], r["provider"], r["metric"]): r for r in timed}
    keys = list(dict.fromkeys((r["op"], r["x"], r["dtype"], r["mode"]) for r in timed))
    providers = in_order((r["provider"] for r in timed), PROVIDERS)
    units = list(dict.fromkeys(r["unit"] for r in timed if r["metric"] == "speedup"))
    header = (
        "op",
        "K·D",
        "K×(C,H,W)",
        "dtype",
        "mode",
        *(f"{p} ms" for p in providers),
        *units,
        *(f"{p} GB/s" for p in providers),
    )
    lines = [header]
    for key in keys:
        op, x, dtype, mode = key
        first = next(r for r in timed if (r["op"], r["x"], r["dtype"], r["mode"]) == key)
        latent = first["latent"].replace("x", ",")
        median = {
            (provider, metric): row["median"]
            for (o, xx, dt, md, provider, metric), row in index.items()
            if (o, xx, dt, md) == key
        }
        speedups = {
            r["unit"]: r["median"]
            for r in timed
            if r["metric"] == "speedup" and (r["op"], r["x"], r["dtype"], r["mode"]) == key
        }
        lines.append(
            (
                op,
                f"{x:,}",
                f"{first['k']}×({latent})",
                dtype,
                mode,
                *(fmt_number(median.get((p, "time"))) for p in providers),
                *("-" if u not in speedups else f"{speedups[u]:.3g}x" for u in units),
                *(fmt_number(median.get((p, "bandwidth"))) for p in providers),
            )
        )
    table = align_columns(lines, left=(0, 2, 3, 4)) if keys else ""
    host = format_host_table(rows)
    return "\n\n".join(t for t in (table, host) if t)


def format_host_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The ``host`` rows as a table: one line per op, each provider's µs a call and its ratio
    to one ``torch.add`` (whose µs heads the table); empty when there are none."""
    host = [r for r in rows if r["mode"] == "host"]
    add = next((r for r in host if r["op"] == "torch.add"), None)
    ops = list(dict.fromkeys(r["op"] for r in host if r["op"] != "torch.add"))
    if add is None or not ops:
        return ""
    providers = in_order((r["provider"] for r in host if r["op"] != "torch.add"), PROVIDERS)
    value = {(r["op"], r["provider"], r["metric"]): r["median"] for r in host}
    shape = f"{add['k']}×({add['latent'].replace('x', ',')})"
    lines = [
        (
            f"host: µs a call, B=1, {shape}, validate=False; torch.add {add['median']:.2f} µs",
            *(f"{p} µs" for p in providers),
            *(f"{p}/add" for p in providers),
        )
    ]
    for op in ops:
        lines.append(
            (
                op,
                *(fmt_number(value.get((op, p, "time"))) for p in providers),
                *(
                    "-" if (op, p, "ratio") not in value else f"{value[(op, p, 'ratio')]:.3g}x"
                    for p in providers
                ),
            )
        )
    return align_columns(lines, left=(0,))


def plot_csv(csv_path: Path | str, png_path: Path | str | None = None) -> Path:
    """Plot median time (p20-p80 band) vs K·D from a CSV of :func:`write_csv`, one subplot per
    op, one line per provider and mode (``kernel`` dashed), log-log; write a PNG (default: the
    CSV's path with ``.png``).

    Needs matplotlib (``pip install smartgrpo-fast[bench]``); uses the Agg canvas, not pyplot,
    so no global backend is touched.
    """
    csv_path = Path(csv_path)
    png_path = Path(png_path) if png_path is not None else csv_path.with_suffix(".png")
    rows = [r for r in read_csv(csv_path) if r["metric"] == "time" and r["mode"] != "host"]
    if not rows:
        raise ValueError(f"{csv_path}: no 'time' rows to plot")
    ops = list(dict.fromkeys(r["op"] for r in rows))
    providers = in_order((r["provider"] for r in rows), PROVIDERS)
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    ncols = min(2, len(ops))
    nrows = math.ceil(len(ops) / ncols)
    fig = new_figure(6.0 * ncols, 4.2 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, op in zip(axes, ops, strict=False):
        for provider, mode in itertools.product(providers, modes):
            pts = sorted(
                (r["x"], r["median"], r["p20"], r["p80"], r["dtype"])
                for r in rows
                if r["op"] == op and r["provider"] == provider and r["mode"] == mode
            )
            if not pts:
                continue
            xs = [p[0] for p in pts]
            label = f"{provider} ({pts[0][4]})" if len(modes) == 1 else f"{provider} {mode}"
            style = "--" if mode == "kernel" else "-"
            ax.plot(xs, [p[1] for p in pts], style, marker="o", label=label)
            ax.fill_between(xs, [p[2] for p in pts], [p[3] for p in pts], alpha=0.25)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(op)
        ax.set_xlabel("K·D elements")
        ax.set_ylabel("time (ms), median, p20-p80")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    for ax in axes[len(ops) :]:
        ax.set_visible(False)
    fig.suptitle(run_caption(rows[0], "ops"), fontsize=9)
    return save_figure(fig, png_path)
