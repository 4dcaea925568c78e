"""train.plot and ``smartgrpo-fast plot``: curves from RUN/metrics.jsonl and RUN/eval.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from smartgrpo_fast.cli import main
from smartgrpo_fast.train.plot import plot_runs, read_jsonl, read_run

pytest.importorskip("matplotlib")


def write_run(folder: Path, rows: list[dict], evals: list[dict] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if evals is not None:
        (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    return folder


def steps(n: int, time_step: float, slope: float, eval_every: int = 0) -> list[dict]:
    rows = []
    for s in range(1, n + 1):
        row = {"step": s, "reward_mean": slope * s, "time_step": time_step, "loss": 0.1}
        if eval_every and s % eval_every == 0:
            row["eval_reward_mean"] = slope * s + 0.5
        rows.append(row)
    return rows


def test_read_run_wall_time_and_eval_points(tmp_path: Path) -> None:
    run = write_run(tmp_path / "fast", steps(6, 30.0, 0.1, eval_every=3),
                    evals=[{"step": 0, "eval_reward_mean": -1.0},
                           {"step": 3, "eval_reward_mean": 9.0}])  # fmt: skip
    c = read_run(run)
    assert c.name == "fast" and c.steps == [1, 2, 3, 4, 5, 6]
    assert c.values == pytest.approx([0.1 * s for s in range(1, 7)])
    assert c.minutes == pytest.approx([0.5 * s for s in range(1, 7)])  # cumsum of 30 s steps
    # step 0 (the baseline) from eval.jsonl at 0 min; eval.jsonl wins over metrics.jsonl at 3.
    assert c.eval_steps == [0, 3, 6]
    assert c.eval_values == pytest.approx([-1.0, 9.0, 1.1])
    assert c.eval_minutes == pytest.approx([0.0, 1.5, 3.0])


def test_read_run_other_metric_skips_null_and_nan(tmp_path: Path) -> None:
    rows = [{"step": 1, "loss": 1.0, "time_step": 60}, {"step": 2, "loss": None, "time_step": 60},
            {"step": 3, "loss": float("nan"), "time_step": 60},
            {"step": 4, "loss": 0.5, "time_step": 60}]  # fmt: skip
    c = read_run(
        write_run(tmp_path / "r", rows, evals=[{"step": 0, "eval_reward_mean": 1.0}]), "loss"
    )
    assert c.steps == [1, 4] and c.values == [1.0, 0.5] and c.minutes == [1.0, 4.0]
    assert c.eval_steps == []  # eval_loss is nowhere: no markers


def test_plot_two_runs_writes_png(tmp_path: Path) -> None:
    a = write_run(tmp_path / "a", steps(20, 10.0, 0.05, eval_every=5),
                  evals=[{"step": 0, "eval_reward_mean": 0.0}])  # fmt: skip
    b = write_run(tmp_path / "b", steps(10, 40.0, 0.1))
    out = plot_runs([a, b], tmp_path / "plots" / "runs.png")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 800 and im.height > 300
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
    colours = {tuple(int(v) for v in c) for c in np.unique(pixels, axis=0)}
    # C0 and C1 (matplotlib's default cycle) are both drawn: one line per run.
    for rgb in ((31, 119, 180), (255, 127, 14)):
        assert any(sum(abs(x - y) for x, y in zip(c, rgb, strict=True)) < 12 for c in colours)


def test_plot_same_folder_names_use_paths(tmp_path: Path) -> None:
    a = write_run(tmp_path / "x" / "run", steps(3, 1.0, 1.0))
    b = write_run(tmp_path / "y" / "run", steps(3, 1.0, 2.0))
    assert plot_runs([a, b], tmp_path / "o.png").is_file()


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"step": 1, "reward_mean": 1}\nnot json\n', r"metrics.jsonl:2: not valid JSON"),
        ('{"step": 1}\n\n[1, 2]\n', r"metrics.jsonl:3: expected a JSON object, got list"),
        ('{"reward_mean": 1}\n', r"metrics.jsonl:1: expected an integer 'step', got None"),
        ('{"step": "1"}\n', r"metrics.jsonl:1: expected an integer 'step', got '1'"),
        ('{"step": 1, "reward_mean": "high"}\n', r"metrics.jsonl:1: expected a number for "
                                                 r"'reward_mean', got 'high'"),
        ('{"step": 1, "reward_mean": 1, "time_step": []}\n', r":1: expected a number for "
                                                             r"'time_step'"),
        ('{"step": 1, "loss": 1}\n', r"metrics.jsonl: no finite 'reward_mean' on any line"),
        ("", r"no finite 'reward_mean' on any line \(0 lines\)"),
    ],
)  # fmt: skip
def test_read_run_errors_name_file_and_line(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "metrics.jsonl").write_text(text)
    with pytest.raises(ValueError, match=match) as exc:
        read_run(tmp_path)
    assert str(tmp_path / "metrics.jsonl") in str(exc.value)


def test_eval_jsonl_errors_name_it(tmp_path: Path) -> None:
    run = write_run(tmp_path, steps(2, 1.0, 1.0))
    (run / "eval.jsonl").write_text('{"step": 0, "eval_reward_mean": 1}\n{"step": 2,\n')
    with pytest.raises(ValueError, match=r"eval.jsonl:2: not valid JSON"):
        read_run(run)


def test_missing_metrics_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"empty/metrics\.jsonl: not found"):
        plot_runs([tmp_path / "empty"], tmp_path / "o.png")
    with pytest.raises(FileNotFoundError, match=r"nothing\.jsonl: not found"):
        read_jsonl(tmp_path / "nothing.jsonl")
    with pytest.raises(ValueError, match="runs: expected a non-empty list"):
        plot_runs([], tmp_path / "o.png")


def test_cli_plot(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a = write_run(tmp_path / "a", steps(5, 2.0, 1.0))
    b = write_run(tmp_path / "b", steps(5, 3.0, 0.5))
    out = tmp_path / "p.png"
    assert main(["plot", str(a), str(b), "--out", str(out), "--metric", "loss"]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out


@pytest.mark.parametrize(
    "setup, match",
    [("missing", "missing/metrics.jsonl: not found"), ("bad", "metrics.jsonl:1: not valid")],
)
def test_cli_plot_errors(tmp_path: Path, capsys, setup: str, match: str) -> None:
    run = tmp_path / setup
    if setup == "bad":
        run.mkdir()
        (run / "metrics.jsonl").write_text("{\n")
    with pytest.raises(SystemExit) as exc:
        main(["plot", str(run), "--out", str(tmp_path / "p.png")])
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("smartgrpo-fast plot: error:") and match in last
    assert not (tmp_path / "p.png").exists()
