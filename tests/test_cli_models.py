"""`smartgrpo-fast grid` and `smartgrpo-fast bench velocity`, in-process at tiny sizes."""

from __future__ import annotations

import csv

import pytest
from PIL import Image

from smartgrpo_fast.cli import main


def test_grid_writes_a_png(tmp_path, capsys) -> None:
    out = tmp_path / "grid.png"
    assert main(["grid", "--prompts", "2", "--seeds", "3", "--steps", "2", "--out", str(out)]) == 0
    width, height = Image.open(out).size
    assert height == 2 * (32 * 4 + 4) and width > 3 * 32 * 4
    assert str(out) in capsys.readouterr().out


def test_grid_weights(tmp_path, capsys) -> None:
    """--weights reaches the model (grid no longer re-parses its arguments with a parser of
    its own that the command line could not reach)."""
    from smartgrpo_fast.shapes.data import WEIGHTS_DIR

    out = tmp_path / "g.png"
    argv = ["grid", "--prompts", "1", "--seeds", "1", "--steps", "1", "--device", "cpu"]
    assert main([*argv, "--weights", str(WEIGHTS_DIR), "--out", str(out)]) == 0
    assert out.is_file()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--weights", str(tmp_path / "none")])
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    want = f"smartgrpo-fast grid: error: argument --weights: {tmp_path / 'none'}"
    assert last.startswith(want) and "config.json" in last


def test_bench_velocity_rows(tmp_path, capsys) -> None:
    argv = ["bench", "velocity", "--backends", "eager", "--batches", "2", "--repeats", "1",
            "--warmup", "1", "--device", "cpu", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    with (tmp_path / "velocity_tiny_cpu_float32.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["op"], r["provider"], r["x"], r["metric"]) for r in rows] == [
        ("velocity", "eager", "2", "time")
    ]
    assert "cand/s" in capsys.readouterr().out


def test_bench_velocity_rejects_an_unknown_backend(tmp_path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "velocity", "--backends", "tensorrt", "--out", str(tmp_path)])
    assert exc.value.code == 2
