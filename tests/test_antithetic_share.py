"""benchmarks/antithetic_share.py: the odd share on a reward linear in the image, its table."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import load_benchmark

from smartgrpo_fast import models
from smartgrpo_fast.sde import flow_sigmas
from smartgrpo_fast.shapes import sample_prompts


@pytest.fixture(scope="module")
def ab():
    return load_benchmark("antithetic_share")


def _mean_pixel(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    return images.flatten(1).mean(1)


@pytest.mark.parametrize("sde_at", [0, 2])
def test_a_reward_linear_in_the_noise_is_all_odd(ab, sde_at: int) -> None:
    """At a tiny noise level the rollout is linear in eps, and so is the mean pixel: the
    pairs' rewards are a +- b.eps, whose variance is all odd (share 1 with the population
    variance); a constant reward part does not count."""
    model = models.load("tiny")
    sigmas = flow_sigmas(4, model.time_shift).tolist()
    row = ab.odd_share(model, _mean_pixel, sample_prompts(2, 1), sigmas, sde_at, pairs=4,
                       noise_level=1e-3, seed=0)  # fmt: skip
    assert row["sde_step"] == sde_at and row["reward_var"] > 0
    assert row["odd_share"] == pytest.approx(1.0, abs=0.01)


def test_rewards_without_spread_are_an_error(ab) -> None:
    model = models.load("tiny")
    sigmas = flow_sigmas(4, model.time_shift).tolist()
    with pytest.raises(ValueError, match="do not vary"):
        ab.odd_share(model, lambda images, prompts: torch.zeros(len(prompts)),
                     sample_prompts(2, 1), sigmas, 1, pairs=2, noise_level=0.3, seed=0)  # fmt: skip


def test_rows_and_table(ab, tmp_path, capsys) -> None:
    out = tmp_path / "share.jsonl"
    argv = ["--num-prompts", "2", "--pairs", "2", "--steps", "4", "--sde-steps", "1", "2",
            "--out", str(out)]  # fmt: skip
    assert ab.main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["sde_step"] for r in rows] == [1, 2]
    assert all(0 <= r["odd_share"] <= 1 and r["reward_var"] > 0 for r in rows)
    assert "| 2 |" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--noise-level", "0"], "--noise-level"),
        (["--pairs", "0"], "--pairs"),
        (["--steps", "4", "--sde-steps", "3"], "--sde-steps"),
    ],
)
def test_bad_arguments_name_the_flag(ab, capsys, argv: list[str], flag: str) -> None:
    with pytest.raises(SystemExit):
        ab.main(argv)
    assert flag in capsys.readouterr().err
