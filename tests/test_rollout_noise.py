"""benchmarks/rollout_noise.py on 2 prompts: its rows and table."""

from __future__ import annotations

import json

import pytest
from helpers import load_benchmark

from smartgrpo_fast import models, rewards
from smartgrpo_fast.shapes import sample_prompts
from smartgrpo_fast.train.evaluate import EvalConfig, evaluate


@pytest.fixture(scope="module")
def rn():
    return load_benchmark("rollout_noise")


def test_rows_and_table(rn, tmp_path, capsys) -> None:
    out = tmp_path / "rows.jsonl"
    argv = ["--noise-levels", "0.2", "0.7", "--num-prompts", "2", "--group-size", "2",
            "--draws", "2", "--steps", "4", "--eval-steps", "6", "--window-size", "2",
            "--window-range", "1", "3", "--prompt-seed", "5", "--out", str(out)]  # fmt: skip
    assert rn.main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["sampler"] for r in rows] == ["ODE (4 steps)", "ODE (6 steps)",
                                            "sde 0.2 (4 steps)", "sde 0.7 (4 steps)"]  # fmt: skip
    # The ODE rows are `eval --images-per-prompt G*draws` of the same prompts and seed.
    want = evaluate(models.load("tiny"), rewards.load("tiny"), sample_prompts(2, 5),
                    EvalConfig(steps=6, seed=0, images_per_prompt=4))  # fmt: skip
    assert rows[1]["reward"] == pytest.approx(want.mean, abs=1e-4)
    assert rows[1]["match"] == want.match_rate and rows[1]["group_std"] is None
    for r in rows[2:]:  # the SDE rows: a spread, rewards in the classifier's range
        assert r["group_std"] > 0 and r["reward"] <= 0 and 0 <= r["match"] <= 1
    assert rows[2]["reward"] != rows[3]["reward"]  # the noise level reaches the samples
    table = capsys.readouterr().out
    assert "| sde 0.7 (4 steps) |" in table and "8 images per sampler" in table


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--num-prompts", "0"], "--num-prompts"),
        (["--noise-levels", "0.3", "-1"], "--noise-levels"),
        (["--noise-levels", "nan"], "--noise-levels"),
        (["--noise-levels", "0"], "--noise-levels"),  # > 0, not >= 0
    ],
)
def test_bad_arguments_name_the_flag(rn, capsys, argv: list[str], flag: str) -> None:
    with pytest.raises(SystemExit) as exc:
        rn.main(argv)
    assert exc.value.code == 2 and flag in capsys.readouterr().err
