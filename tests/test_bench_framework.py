"""The benchmark framework on its own: timing, run metadata, rows and files, report helpers."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest
import torch

from smartgrpo_fast.bench import case, op_cases, ops, report, rows, runinfo, timing
from smartgrpo_fast.bench.case import CaseShape, OpCase, forced_backend, parse_device
from smartgrpo_fast.bench.rows import CSV_FIELDS, measurement_rows
from smartgrpo_fast.bench.runinfo import COMMIT_ENV, RunInfo, collect_run_info, git_commit
from smartgrpo_fast.bench.timing import Timing, measure, quantile, summarize
from smartgrpo_fast.ops import BACKEND_ENV

CPU = torch.device("cpu")
INFO = RunInfo("cpu", "a cpu", "2.0", "0.1", "abc123", "2025-01-01T00:00:00+00:00")


def _case(min_bytes: int = 4096) -> OpCase:
    shape = CaseShape(batch=1, k=16, latent=(16, 2, 2), elites=4)
    return OpCase("x0_estimate", "cpp", shape, torch.bfloat16, CPU, lambda: None, min_bytes)


# ----------------------------------------------------------------------------- timing


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([3.0], 0.5, 3.0),
        ([4.0, 1.0, 3.0, 2.0], 0.0, 1.0),
        ([4.0, 1.0, 3.0, 2.0], 1.0, 4.0),
        ([4.0, 1.0, 3.0, 2.0], 0.5, 2.5),
        ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 0.2, 2.0),
        ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 0.8, 5.0),
        ([0.0, 10.0], 0.25, 2.5),
    ],
)
def test_quantile_interpolates_linearly(values: list[float], q: float, expected: float) -> None:
    assert quantile(values, q) == pytest.approx(expected)
    assert quantile(values, q) == pytest.approx(torch.quantile(torch.tensor(values), q).item())


@pytest.mark.parametrize(("values", "q"), [([], 0.5), ([1.0], -0.1), ([1.0], 1.5)])
def test_quantile_refuses_empty_values_and_q_outside_0_1(values: list[float], q: float) -> None:
    with pytest.raises(ValueError):
        quantile(values, q)


def test_summarize_gives_median_p20_p80_and_keeps_samples() -> None:
    t = summarize([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (t.median, t.p20, t.p80) == pytest.approx((3.0, 1.8, 4.2))
    assert t.samples == (5.0, 1.0, 4.0, 2.0, 3.0)


def test_measure_runs_warmup_then_repeats_without_grad() -> None:
    grad_enabled = []

    def fn() -> None:
        grad_enabled.append(torch.is_grad_enabled())

    t = measure(fn, CPU, warmup=2, repeats=5)
    assert len(grad_enabled) == 7 and not any(grad_enabled)
    assert len(t.samples) == 5 and all(s >= 0 for s in t.samples)
    assert t.p20 <= t.median <= t.p80


def test_measure_host_gives_microseconds_a_call_per_round() -> None:
    calls = []
    t = timing.measure_host(lambda: calls.append(torch.is_grad_enabled()), CPU, calls=7,
                            rounds=3, warmup=2)  # fmt: skip
    assert len(calls) == 2 + 7 * 3 and not any(calls)
    assert len(t.samples) == 3 and all(s >= 0 for s in t.samples)
    slow = timing.measure_host(lambda: time.sleep(1e-3), CPU, calls=2, rounds=1, warmup=0)
    assert slow.median >= 1000.0  # µs


def test_measure_graph_needs_cuda() -> None:
    with pytest.raises(ValueError, match=r"^device: measure_graph needs a CUDA device"):
        timing.measure_graph(lambda: None, CPU)


@pytest.mark.cuda
def test_measure_graph_times_the_kernels_of_a_captured_call() -> None:
    x = torch.randn(1 << 20, device="cuda")
    t = timing.measure_graph(lambda: x.mul_(1.0), torch.device("cuda"), calls=10, replays=3)
    assert len(t.samples) == 3 and 0 < t.median < 1.0  # ms a call: one 4 MiB kernel
    eager = timing.measure(lambda: x.mul_(1.0), torch.device("cuda"), warmup=1, repeats=3,
                           sync_each=True)  # fmt: skip
    assert eager.median > 0


def test_synchronize_on_cpu_does_nothing() -> None:
    timing.synchronize(CPU)  # no CUDA call: would raise on a machine without CUDA


# ----------------------------------------------------------------------------- run info


def test_collect_run_info_takes_the_commit_from_the_environment(monkeypatch) -> None:
    monkeypatch.setattr(runinfo, "git_commit", lambda: pytest.fail("git must not be asked"))
    monkeypatch.setenv(COMMIT_ENV, " 0123456789ab \n")
    info = collect_run_info(CPU)
    assert info.git_commit == "0123456789ab"
    assert info.device == "cpu" and info.torch_version == torch.__version__


@pytest.mark.parametrize("value", [None, "", "  "])
def test_collect_run_info_asks_git_when_the_variable_is_unset_or_empty(
    monkeypatch, value: str | None
) -> None:
    monkeypatch.setattr(runinfo, "git_commit", lambda: "fromgit-dirty")
    if value is None:
        monkeypatch.delenv(COMMIT_ENV, raising=False)
    else:
        monkeypatch.setenv(COMMIT_ENV, value)
    assert collect_run_info(CPU).git_commit == "fromgit-dirty"


def test_git_commit_outside_a_checkout_is_unknown(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert git_commit(tmp_path) == "unknown"


def test_run_info_as_row_names_csv_columns() -> None:
    row = INFO.as_row()
    assert set(row) <= set(CSV_FIELDS)
    assert row["git_commit"] == "abc123" and row["device_name"] == "a cpu"


# ----------------------------------------------------------------------------- rows and files


def test_measurement_rows_time_and_bandwidth() -> None:
    t = Timing(median=2.0, p20=1.0, p80=4.0, samples=(1.0, 2.0, 4.0))
    time_row, bw_row = measurement_rows(_case(min_bytes=4_000_000), t, INFO, repeats=3)
    assert list(time_row) == list(CSV_FIELDS) and list(bw_row) == list(CSV_FIELDS)
    assert (time_row["metric"], time_row["unit"], time_row["median"]) == ("time", "ms", 2.0)
    assert (time_row["x"], time_row["latent"], time_row["dtype"]) == (1024, "16x2x2", "bfloat16")
    assert (bw_row["metric"], bw_row["unit"]) == ("bandwidth", "GB/s")
    # 4 MB in 2 ms is 2 GB/s; the slowest call (p80 time) is the lowest bandwidth (p20)
    assert (bw_row["median"], bw_row["p20"], bw_row["p80"]) == pytest.approx((2.0, 1.0, 4.0))
    assert time_row["git_commit"] == "abc123"


def test_ratio_row_bounds_are_conservative() -> None:
    row = {"median": 2.0, "p20": 1.0, "p80": 4.0, "provider": "p"}
    base = {"median": 8.0, "p20": 6.0, "p80": 12.0}
    got = rows.ratio_row(row, base, "base/p")
    assert (got["metric"], got["unit"], got["provider"]) == ("speedup", "base/p", "p")
    assert (got["median"], got["p20"], got["p80"]) == (4.0, 1.5, 12.0)
    assert rows.ratio_row({**row, "median": 0.0}, base, "u")["median"] == math.inf


def test_ordered_row_needs_every_column() -> None:
    full = dict.fromkeys(reversed(CSV_FIELDS), 0) | {"extra": 1}
    assert list(rows.ordered_row(full)) == list(CSV_FIELDS)
    with pytest.raises(KeyError):
        rows.ordered_row({"op": "x"})


def test_csv_round_trip_restores_numbers(tmp_path: Path) -> None:
    t = Timing(median=0.25, p20=0.125, p80=0.5, samples=())
    written = measurement_rows(_case(), t, INFO, repeats=7)
    path = rows.write_csv(written, tmp_path / "sub" / "r.csv")
    assert path.read_text().splitlines()[0] == ",".join(CSV_FIELDS)
    back = rows.read_csv(path)
    assert back == written
    assert isinstance(back[0]["x"], int) and isinstance(back[0]["median"], float)


def test_json_writes_non_finite_values_as_null(tmp_path: Path) -> None:
    t = Timing(median=0.0, p20=0.0, p80=0.0, samples=())  # a zero-time call: inf GB/s
    written = measurement_rows(_case(), t, INFO, repeats=1)
    data = json.loads(rows.write_json(written, tmp_path / "r.json").read_text())
    assert [list(d) for d in data] == [list(CSV_FIELDS)] * 2
    assert data[1]["metric"] == "bandwidth" and data[1]["median"] is None


# ----------------------------------------------------------------------------- cases


def test_parse_device_accepts_cpu_and_cuda_only() -> None:
    assert parse_device("cuda:1") == torch.device("cuda", 1)
    for bad in ("mps", "gpu", "cuda:x"):
        with pytest.raises(ValueError, match="expected cpu, cuda or cuda:N"):
            parse_device(bad)


def test_forced_backend_sets_and_restores(monkeypatch) -> None:
    monkeypatch.setenv(BACKEND_ENV, "cpp")
    with forced_backend("reference"):
        assert os.environ[BACKEND_ENV] == "reference"
    assert os.environ[BACKEND_ENV] == "cpp"
    monkeypatch.delenv(BACKEND_ENV)
    with forced_backend("reference"):
        pass
    assert BACKEND_ENV not in os.environ
    with forced_backend(None):
        assert BACKEND_ENV not in os.environ


def test_op_case_runs_under_its_backend(monkeypatch) -> None:
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    seen = []
    fn = lambda: seen.append(os.environ.get(BACKEND_ENV))
    c = OpCase("op", "p", CaseShape(1, 2, (3,), 1), torch.float32, CPU, fn, 0, backend="reference")
    c.run()
    assert seen == ["reference"] and BACKEND_ENV not in os.environ
    assert op_cases.build_case("x0_estimate", "unfused", 256).backend is None
    assert op_cases.build_case("x0_estimate", "reference", 256).backend == "reference"


# ----------------------------------------------------------------------------- report


def test_with_progress_prints_a_line_per_item_off_a_terminal(capsys) -> None:
    items = list(report.with_progress(["a", "b"], str.upper, desc="d"))
    assert items == ["a", "b"]
    assert capsys.readouterr().err.splitlines() == ["[1/2] A", "[2/2] B"]
    assert list(report.with_progress(["a"], str.upper, desc="d", enabled=False)) == ["a"]
    assert capsys.readouterr().err == ""


def test_number_format_and_order() -> None:
    assert [report.fmt_number(v) for v in (None, 0.123456, 12345.6)] == ["-", "0.1235", "12,346"]
    assert report.in_order(["z", "b", "a", "z"], ("a", "b", "c")) == ["a", "b", "z"]


def test_align_columns_pads_and_rules() -> None:
    text = report.align_columns([("name", "ms"), ("ab", "1.5"), ("abcdef", "10")], left=(0,))
    assert text.splitlines() == ["name     ms", "------  ---", "ab      1.5", "abcdef   10"]


def test_run_caption_names_the_run() -> None:
    caption = report.run_caption(INFO.as_row() | {"smartgrpo_fast_version": "9.9"}, "ops")
    assert (
        caption == "smartgrpo_fast 9.9 ops on a cpu\ntorch 2.0, abc123, 2025-01-01T00:00:00+00:00"
    )


# ----------------------------------------------------------------------------- old import path


#: What the ops suite itself defines; every other name of bench.ops is a re-export.
OPS_OWN = set(
    "BASELINES CPU_PROVIDERS CPU_SIZES CUDA_PROVIDERS CUDA_SIZES MODES OpsBenchConfig "
    "format_host_table format_table host_rows plot_csv run_ops_bench speedup_rows".split()
)


def test_bench_ops_still_exports_the_moved_names() -> None:
    homes = (case, op_cases, rows, runinfo, timing)
    for name in ops.__all__:
        obj = getattr(ops, name)
        moved = [m for m in homes if name in getattr(m, "__all__", ())]
        assert len(moved) == (name not in OPS_OWN), name
        assert all(getattr(m, name) is obj for m in moved), name


@pytest.mark.cuda
def test_ops_bench_on_cuda_times_eager_kernel_and_host() -> None:
    """On CUDA every (op, provider, size) has an eager and a kernel time, and every
    (op, provider) a host time and ratio; the kernel of a fused op never costs more than its
    eager call (the eager interval holds the kernels and the host work)."""
    config = ops.OpsBenchConfig.for_device(
        "cuda", providers=("triton", "unfused"), sizes=(2**20,), repeats=5, warmup=2,
        dtype="bfloat16",
    )  # fmt: skip
    result = ops.run_ops_bench(config, progress=False)
    times = {(r["op"], r["provider"], r["mode"]): r for r in result if r["metric"] == "time"}
    for op in op_cases.OPS:
        for provider in ("triton", "unfused"):
            eager, kernel = times[(op, provider, "eager")], times[(op, provider, "kernel")]
            assert kernel["median"] > 0 and eager["median"] > 0
            assert times[(op, provider, "host")]["unit"] == "us"
        assert times[(op, "triton", "kernel")]["median"] <= times[(op, "triton", "eager")]["median"]
    table = ops.format_table(result)
    assert "kernel" in table and "eager" in table and "torch.add" in table
