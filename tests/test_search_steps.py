"""benchmarks/search_steps.py: the variants share every draw but the searched steps, the
paired statistics, and the script's table and JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import load_benchmark

#: 1 prompt x 4 rollouts, 4 sampling steps, a window of 2 SDE steps: seconds on CPU.
SMALL = [
    "sample.prompts_per_step=1", "sample.group_size=4", "sample.steps=4",
    "sample.sde_window_size=2", "sample.sde_window_range=[0, 3]", "search.k=2",
    "search.rounds=1", "search.top=1", "device=cpu", "eval.every=0",
]  # fmt: skip


@pytest.fixture(scope="module")
def ss():
    return load_benchmark("search_steps")


def test_variants_cover_each_prefix_of_the_window(ss) -> None:
    names = [name for name, _ in ss.variants(3)]
    assert names == ["random", "smart, every SDE step", "smart, first 1 of 3",
                     "smart, first 2 of 3", "smart, last 1 of 3", "smart, last 2 of 3"]  # fmt: skip


def test_paired_statistics(ss) -> None:
    a = torch.tensor([1.0, 2.0, 3.0, float("nan"), 5.0], dtype=torch.float64)
    b = torch.tensor([0.5, 2.0, 2.0, 1.0, 4.0], dtype=torch.float64)
    s = ss.paired(a, b)
    d = torch.tensor([0.5, 0.0, 1.0, 1.0], dtype=torch.float64)  # the NaN row left out
    assert s["n"] == 4 and s["mean_diff"] == pytest.approx(float(d.mean()))
    assert s["t"] == pytest.approx(float(d.mean() / (d.std() / math.sqrt(4))))
    assert s["win_rate"] == pytest.approx((3 + 0.5) / 4)
    same = ss.paired(b, b)
    assert same["mean_diff"] == 0 and same["t"] is None and same["win_rate"] == 0.5


def test_script_pairs_the_variants(ss, tmp_path: Path, capsys) -> None:
    out = tmp_path / "ss.json"
    assert ss.main(["--batches", "1", "--out", str(out), *SMALL]) == 0
    res = json.loads(out.read_text())
    rows = {r["variant"]: r for r in res["variants"]}
    assert list(rows) == ["random", "smart, every SDE step", "smart, first 1 of 2",
                          "smart, last 1 of 2"]  # fmt: skip
    # 4 sampling rows; K*N = 2 per searched step; one reused velocity per searched step
    # (both window steps are followed by a step)
    assert rows["random"]["model_rows_per_rollout"] == 4
    assert rows["smart, every SDE step"]["model_rows_per_rollout"] == 4 + 2 * 2 - 2
    assert rows["smart, first 1 of 2"]["model_rows_per_rollout"] == 4 + 2 - 1
    assert rows["smart, last 1 of 2"]["model_rows_per_rollout"] == 4 + 2 - 1
    assert all(r["rollouts"] == 4 and r["vs_random"]["n"] == 4 for r in rows.values())
    assert rows["random"]["vs_random"]["mean_diff"] == 0
    printed = capsys.readouterr().out
    assert "| smart, first 1 of 2 | 5 |" in printed


def test_a_window_of_one_step_is_an_error(ss, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        ss.main(["--batches", "1", *SMALL, "sample.sde_window_size=1"])
    assert exc.value.code == 2
    assert "sample.sde_window_size=2 or more" in capsys.readouterr().err
