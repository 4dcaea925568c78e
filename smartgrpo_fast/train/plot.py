"""Training curves of runs: ``smartgrpo-fast plot RUN [RUN ...] --out FILE.png``.

A run folder holds ``metrics.jsonl`` (one JSON object per optimizer step, with at least
``step``, the plotted metric and ``time_step``, the seconds of that step) and, when the trainer
evaluated, ``eval.jsonl`` (``step`` and ``eval_reward_mean``; step 0 is the baseline before any
update). Wall time is the cumulative sum of ``time_step`` (training only: evaluation and
checkpoint time are not in it).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smartgrpo_fast.train.data import jsonl_objects

__all__ = ["RunCurves", "plot_runs", "read_jsonl", "read_run"]


def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of each line of a JSON-lines file (blank lines skipped); every
    object has an integer ``step``.

    Raises FileNotFoundError naming the file; ValueError naming the file and line number for a
    line that is not a JSON object with an integer ``step``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: not found (a run folder of smartgrpo-fast train holds it)"
        )
    rows = jsonl_objects(path)
    for lineno, row in rows:
        step = row.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"{path}:{lineno}: expected an integer 'step', got {step!r}")
    return rows


def _number(row: dict[str, Any], key: str, where: str) -> float | None:
    """``row[key]`` as a float; None when absent or null; a ValueError naming ``where`` (file
    and line) when it is not a number."""
    v = row.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError(f"{where}: expected a number for {key!r}, got {v!r}")
    return float(v)


@dataclass
class RunCurves:
    """One run's series. ``steps``/``values``/``minutes``: the metric's points (non-finite
    values dropped); ``eval_*``: the evaluation points."""

    name: str
    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    minutes: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_values: list[float] = field(default_factory=list)
    eval_minutes: list[float] = field(default_factory=list)


def read_run(run: Path, metric: str = "reward_mean") -> RunCurves:
    """``metric`` against step and wall time (minutes) from ``run/metrics.jsonl``, and
    ``eval_<metric>`` from its lines and from ``run/eval.jsonl`` (which wins on a shared step).
    An evaluation's wall time is the training time at the end of its step (0 at step 0)."""
    run = Path(run)
    path = run / "metrics.jsonl"
    rows = read_jsonl(path)
    curves = RunCurves(run.name or str(run))
    eval_key = f"eval_{metric}"
    seconds, clock = 0.0, {0: 0.0}  # step -> training seconds at its end
    evals: dict[int, float] = {}
    for lineno, row in rows:
        where = f"{path}:{lineno}"
        seconds += _number(row, "time_step", where) or 0.0
        clock[row["step"]] = seconds
        v = _number(row, metric, where)
        if v is not None and math.isfinite(v):
            curves.steps.append(row["step"])
            curves.values.append(v)
            curves.minutes.append(seconds / 60.0)
        e = _number(row, eval_key, where)
        if e is not None and math.isfinite(e):
            evals[row["step"]] = e
    eval_path = run / "eval.jsonl"
    if eval_key != metric and eval_path.is_file():
        for lineno, row in read_jsonl(eval_path):
            e = _number(row, eval_key, f"{eval_path}:{lineno}")
            if e is not None and math.isfinite(e):
                evals[row["step"]] = e
    if not curves.steps and not evals:
        raise ValueError(f"{path}: no finite {metric!r} on any line ({len(rows)} lines)")
    known = sorted(clock)
    for step in sorted(evals):
        i = bisect.bisect_right(known, step)  # the last logged step <= this one
        curves.eval_steps.append(step)
        curves.eval_values.append(evals[step])
        curves.eval_minutes.append(clock[known[i - 1]] / 60.0 if i else 0.0)
    return curves


def plot_runs(runs: list[Path], out: Path, *, metric: str = "reward_mean") -> Path:
    """Draw ``metric`` against the step (left) and the training wall time in minutes (right),
    one line per run labelled by its folder name (the whole path when two names collide),
    with ``eval_<metric>`` as markers of the same colour; write the PNG ``out``.

    Raises FileNotFoundError / ValueError from :func:`read_run` (naming the file and line);
    ImportError without matplotlib."""
    if isinstance(runs, str | Path) or not runs:
        raise ValueError(f"runs: expected a non-empty list of run folders, got {runs!r}")
    curves = [read_run(Path(r), metric) for r in runs]
    names = [c.name for c in curves]
    for c, r in zip(curves, runs, strict=True):
        if names.count(c.name) > 1:
            c.name = str(r)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120, sharey=True)
    for i, c in enumerate(curves):
        color = f"C{i % 10}"
        for ax, x, ex in ((axes[0], c.steps, c.eval_steps), (axes[1], c.minutes, c.eval_minutes)):
            if c.steps:
                ax.plot(x, c.values, "-", color=color, lw=1.2, label=c.name)
            if c.eval_steps:
                ax.plot(ex, c.eval_values, "o--", color=color, ms=5, lw=0.8, alpha=0.9,
                        label=f"{c.name} (eval_{metric})")  # fmt: skip
    axes[0].set_xlabel("optimizer step")
    axes[1].set_xlabel("training wall time (min, sum of time_step)")
    axes[0].set_ylabel(metric)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(f"{metric}: {len(curves)} run(s)")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
