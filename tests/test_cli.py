"""The ``smartgrpo-fast`` command line, run in-process at a tiny size.

Nothing here depends on a measured time: only on the rows, files and messages the CLI writes.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import io
import json
import math
import runpy
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
import torch

import smartgrpo_fast
from smartgrpo_fast.bench.op_cases import OPS, case_shape, provider_problem
from smartgrpo_fast.bench.ops import BASELINES, CPU_PROVIDERS, format_table, speedup_rows
from smartgrpo_fast.bench.rows import CSV_FIELDS
from smartgrpo_fast.cli import build_parser, main

REQUIRED_COLUMNS = {
    "op",
    "provider",
    "mode",
    "metric",
    "unit",
    "x",
    "median",
    "p20",
    "p80",
    "device_name",
    "torch_version",
    "smartgrpo_fast_version",
    "git_commit",
    "date",
}
TINY = ["--sizes", "4096", "--repeats", "1", "--warmup", "0", "--device", "cpu", "--no-progress"]


@functools.cache
def default_providers() -> tuple[str, ...]:
    """The default CPU providers that can run here (cpp only when the C++ extension built)."""
    return tuple(p for p in CPU_PROVIDERS if provider_problem(p, "cpu") is None)


def _speedup_units(providers: tuple[str, ...]) -> set[str]:
    return {
        f"{base}/{p}"
        for base in BASELINES
        if base in providers
        for p in providers
        if p not in ("unfused", base)
    }


@dataclass(frozen=True)
class CliRun:
    code: int
    stdout: str
    stderr: str
    out: Path


def _run(argv: list[str], out: Path) -> CliRun:
    stdout, stderr = io.StringIO(), io.StringIO()
    with (
        pytest.MonkeyPatch.context() as mp,
        contextlib.redirect_stdout(stdout),
        contextlib.redirect_stderr(stderr),
    ):
        mp.delenv("SMARTGRPO_BACKEND", raising=False)
        code = main([*argv, "--out", str(out)])
    return CliRun(code, stdout.getvalue(), stderr.getvalue(), out)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> CliRun:
    """All four ops, the default providers, one size of 4096 elements, one timed call each."""
    return _run(["bench", "ops", *TINY], tmp_path_factory.mktemp("bench_out"))


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def test_bench_ops_writes_csv_with_every_op_and_provider(full_run: CliRun) -> None:
    assert full_run.code == 0
    header, rows = _read_csv(full_run.out / "ops_cpu_float32.csv")
    assert header == list(CSV_FIELDS)
    assert set(header) >= REQUIRED_COLUMNS
    units = _speedup_units(default_providers())
    timed = [r for r in rows if r["mode"] == "eager"]  # CPU: no kernel mode
    host = [r for r in rows if r["mode"] == "host"]
    assert len(timed) + len(host) == len(rows)
    for op in OPS:
        for metric in ("time", "bandwidth"):
            providers = {r["provider"] for r in timed if r["op"] == op and r["metric"] == metric}
            assert providers == set(default_providers()), (op, metric)
        speedups = [r for r in timed if r["op"] == op and r["metric"] == "speedup"]
        assert {r["unit"] for r in speedups} == units, op
        assert len(speedups) == len(units), op
        for metric in ("time", "ratio"):  # the host case: every provider, time and ratio
            providers = {r["provider"] for r in host if r["op"] == op and r["metric"] == metric}
            assert providers == set(default_providers()), (op, metric)
    assert len(timed) == len(OPS) * (2 * len(default_providers()) + len(units))
    assert len(host) == 1 + 2 * len(OPS) * len(default_providers())  # + one torch.add
    assert {r["unit"] for r in timed if r["metric"] == "time"} == {"ms"}
    assert {r["unit"] for r in timed if r["metric"] == "bandwidth"} == {"GB/s"}
    assert {r["unit"] for r in host if r["metric"] == "time"} == {"us"}
    assert {r["unit"] for r in host if r["metric"] == "ratio"} == {"x torch.add"}
    (add,) = [r for r in host if r["op"] == "torch.add"]
    assert 0 < float(add["median"]) < math.inf
    for r in host:
        if r["metric"] == "ratio":  # time over the torch.add timed just before: > 0, finite
            med, p20, p80 = (float(r[q]) for q in ("median", "p20", "p80"))
            assert 0 < p20 <= med <= p80 < math.inf


def test_bench_ops_rows_carry_run_metadata(full_run: CliRun) -> None:
    _, rows = _read_csv(full_run.out / "ops_cpu_float32.csv")
    for row in rows:
        assert row["mode"] in ("eager", "host")
        if row["mode"] == "eager":
            assert int(row["x"]) == 4096  # 16 candidates of a (16, 4, 4) latent
            assert (int(row["k"]), row["latent"]) == (16, "16x4x4")
        else:  # the host case: 4 candidates of a (4, 8, 8) latent
            assert (int(row["x"]), int(row["k"]), row["latent"]) == (1024, 4, "4x8x8")
        assert row["dtype"] == "float32"
        assert row["device"] == "cpu"
        assert row["device_name"]
        assert row["torch_version"] == torch.__version__
        assert row["smartgrpo_fast_version"] == smartgrpo_fast.__version__
        assert row["git_commit"]
        assert datetime.fromisoformat(row["date"]).tzinfo is not None
        med, p20, p80 = (float(row[k]) for k in ("median", "p20", "p80"))
        assert all(math.isfinite(v) and v >= 0 for v in (med, p20, p80))
        assert p20 <= med <= p80


def test_bench_ops_json_matches_csv(full_run: CliRun) -> None:
    _, csv_rows = _read_csv(full_run.out / "ops_cpu_float32.csv")
    json_rows = json.loads((full_run.out / "ops_cpu_float32.json").read_text())
    assert [list(r) for r in json_rows] == [list(CSV_FIELDS)] * len(csv_rows)
    key = lambda r: (r["op"], r["provider"], r["metric"], str(r["x"]))
    assert [key(r) for r in json_rows] == [key(r) for r in csv_rows]
    for jr, cr in zip(json_rows, csv_rows, strict=True):
        assert float(jr["median"]) == pytest.approx(float(cr["median"]))


def test_bench_ops_writes_png(full_run: CliRun) -> None:
    png = full_run.out / "ops_cpu_float32.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(png) in full_run.stdout


def test_bench_ops_prints_table_and_paths(full_run: CliRun) -> None:
    for op in OPS:
        assert op in full_run.stdout
    for provider in default_providers():
        assert f"{provider} ms" in full_run.stdout
        assert f"{provider} GB/s" in full_run.stdout
    for header in ("K·D", "mode", *_speedup_units(default_providers())):
        assert header in full_run.stdout
    assert "torch.add" in full_run.stdout  # the host table
    for provider in default_providers():
        assert f"{provider} µs" in full_run.stdout and f"{provider}/add" in full_run.stdout
    for suffix in ("csv", "json"):
        assert str(full_run.out / f"ops_cpu_float32.{suffix}") in full_run.stdout


def test_bench_ops_subset_dtype_and_no_plot(tmp_path: Path) -> None:
    argv = ["bench", "ops", *TINY, "--ops", "x0_estimate", "--dtype", "bfloat16", "--no-plot"]
    run = _run(argv, tmp_path)
    assert run.code == 0
    _, rows = _read_csv(tmp_path / "ops_cpu_bfloat16.csv")
    assert {r["op"] for r in rows} == {"x0_estimate", "torch.add"}  # + the host yardstick
    assert {r["dtype"] for r in rows} == {"bfloat16"}
    assert not list(tmp_path.glob("*.png"))
    assert "sample_perturb" not in run.stdout


def test_size_that_is_not_latent_shaped_is_rounded_down_with_a_note(tmp_path: Path) -> None:
    argv = ["bench", "ops", *TINY, "--sizes", "5000", "--ops", "topk_select", "--no-plot"]
    run = _run(argv, tmp_path)
    shape = case_shape(5000)  # (16, 4, 4) latents: K = 5000 // 256 = 19
    assert (shape.k, shape.latent, shape.elements) == (19, (16, 4, 4), 4864)
    assert "runs as K·D = 4864" in run.stderr
    _, rows = _read_csv(tmp_path / "ops_cpu_float32.csv")
    assert {int(r["x"]) for r in rows if r["mode"] != "host"} == {4864}


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"smartgrpo-fast {smartgrpo_fast.__version__}"


def test_python_dash_m_runs_the_cli(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["smartgrpo_fast", "--version"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("smartgrpo_fast", run_name="__main__")
    assert exc.value.code == 0
    assert smartgrpo_fast.__version__ in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sizes", "0"], "argument --sizes"),
        (["--sizes", "lots"], "argument --sizes"),
        (["--ops", "softmax"], "argument --ops: invalid choice: 'softmax'"),
        (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
        (["--repeats", "0"], "argument --repeats"),
        (["--warmup", "-1"], "argument --warmup"),
        (["--device", "tpu"], "argument --device"),
        (["--providers", "fused"], "argument --providers: invalid choice: 'fused'"),
    ],
)
def test_bad_argument_exits_with_a_clear_error(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "ops", *argv, "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "smartgrpo-fast bench ops: error:" in err
    assert message in err
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_device_without_cuda_is_an_argument_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "ops", "--device", "cuda", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "argument --device: 'cuda' requested but CUDA is not available" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("argv", [[], ["bench"]])
def test_missing_command_is_an_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "required" in capsys.readouterr().err


def test_table_marks_a_missing_provider() -> None:
    row = {
        "op": "x0_estimate",
        "provider": "cpp",
        "mode": "eager",
        "metric": "time",
        "x": 4096,
        "k": 16,
        "latent": "16x4x4",
        "dtype": "float32",
        "median": 0.5,
    }
    table = format_table([row])
    assert "x0_estimate" in table and "16×(16,4,4)" in table
    assert table.splitlines()[-1].split()[-1] == "-"


def test_providers_subset_and_speedups(tmp_path: Path) -> None:
    argv = ["bench", "ops", *TINY, "--ops", "cem_update", "--no-plot"]
    run = _run([*argv, "--providers", "unfused", "reference"], tmp_path)
    assert run.code == 0
    _, rows = _read_csv(tmp_path / "ops_cpu_float32.csv")
    assert {r["provider"] for r in rows} == {"unfused", "reference"}
    assert [r["unit"] for r in rows if r["metric"] == "speedup"] == ["unfused/reference"]
    assert "reference ms" in run.stdout and "cpp ms" not in run.stdout


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the error without CUDA")
def test_provider_that_cannot_run_is_an_argument_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "ops", *TINY, "--providers", "cuda", "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --providers: cuda cannot run on cpu: SMARTGRPO_BACKEND=cuda" in err


def test_default_provider_that_cannot_run_is_left_out_with_a_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from smartgrpo_fast.bench import ops as bench_ops

    monkeypatch.setattr(
        bench_ops,
        "provider_problem",
        lambda provider, device: "no compiler" if provider == "cpp" else None,
    )
    argv = ["bench", "ops", *TINY, "--ops", "x0_estimate", "--no-plot"]
    run = _run(argv, tmp_path)
    assert run.code == 0
    assert "note: provider cpp left out: no compiler" in run.stderr
    _, rows = _read_csv(tmp_path / "ops_cpu_float32.csv")
    assert {r["provider"] for r in rows} == {"reference", "unfused"}


def test_speedup_rows_divide_baseline_by_provider() -> None:
    def time_row(provider: str, median: float) -> dict:
        row = dict.fromkeys(CSV_FIELDS, "")
        row |= {"op": "sample_perturb", "x": 4096, "dtype": "float32", "provider": provider}
        return row | {"metric": "time", "unit": "ms", "median": median, "p20": median,
                      "p80": median}  # fmt: skip

    rows = [time_row("cpp", 1.0), time_row("reference", 8.0), time_row("unfused", 2.0)]
    got = {(r["provider"], r["unit"]): r["median"] for r in speedup_rows(rows)}
    assert got == {
        ("cpp", "unfused/cpp"): 2.0,
        ("reference", "unfused/reference"): 0.25,
        ("cpp", "reference/cpp"): 8.0,
    }
    # modes are never mixed: a kernel row is compared with the kernel rows of the run only
    eager = [r | {"mode": "eager"} for r in rows]
    kernel = [
        time_row("cpp", 0.5) | {"mode": "kernel"},
        time_row("unfused", 4.0) | {"mode": "kernel"},
    ]
    got = {(r["mode"], r["unit"]): r["median"] for r in speedup_rows(eager + kernel)}
    assert got[("eager", "unfused/cpp")] == 2.0 and got[("kernel", "unfused/cpp")] == 8.0
    assert ("kernel", "reference/cpp") not in got


def _subparsers(parser: argparse.ArgumentParser, prefix: str = "") -> list:
    """(command path, parser) of every sub-command of ``parser``, recursively."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += [(f"{prefix}{name}", sub), *_subparsers(sub, f"{prefix}{name} ")]
    return out


def test_every_option_of_every_command_names_its_default() -> None:
    """Every option's help says its default (or that it is required); flags say 'off' or
    what happens without them. -h and --version are argparse's own."""
    commands = _subparsers(build_parser())
    assert {"bench ops", "bench velocity", "bench search", "bench train", "grid", "search",
            "eval", "plot", "train"} <= {name for name, _ in commands}  # fmt: skip
    missing = [
        f"{name} {'/'.join(action.option_strings)}"
        for name, sub in commands
        for action in sub._actions
        if action.option_strings
        and not isinstance(action, (argparse._HelpAction, argparse._VersionAction))
        and not any(word in (action.help or "") for word in ("default", "required"))
    ]
    assert not missing, missing


@pytest.mark.parametrize("command", ["grid", "search", "eval", "bench velocity", "bench search"])
def test_help_of_every_command_renders(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*command.split(), "--help"])
    assert exc.value.code == 0 and "default" in capsys.readouterr().out
