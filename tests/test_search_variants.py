"""benchmarks/search_variants.py on 2 prompts: its rows, its table and --rejudge."""

from __future__ import annotations

import json

import pytest
from helpers import load_benchmark


@pytest.fixture(scope="module")
def sv():
    return load_benchmark("search_variants")


def test_rows_table_and_rejudge(sv, tmp_path, capsys, monkeypatch) -> None:
    small = sv.replace(sv.BASE, k=2, rounds=2, top=1, graph=False)
    monkeypatch.setitem(sv.VARIANTS, "small", ("tiny-margin", small))
    out, images = tmp_path / "rows.jsonl", tmp_path / "img"
    argv = ["--prompt-seed", "3", "--num-prompts", "2", "--variants", "small", "--out", str(out),
            "--save-images", str(images)]  # fmt: skip
    assert sv.main(argv) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["variant"] == "small" and row["guide"] == "tiny-margin" and row["prompts"] == 2
    assert row["calls_per_rollout"]["searched"] == row["calls_per_rollout"]["bestof"]
    for metric in ("guided", "logprob", "match"):
        assert set(row[metric]) == {"random", "bestof", "searched", "t_vs_bestof", "t_vs_random"}
    assert 0 <= row["match"]["searched"] <= 1 and "judge" not in row
    assert "| small | tiny-margin | 2, 2, 1 |" in capsys.readouterr().out
    judged = tmp_path / "judged.jsonl"
    assert sv.main(["--prompt-seed", "3", "--rejudge", str(out), "--judge", "shapes-judge",
                    "--save-images", str(images), "--out", str(judged)]) == 0  # fmt: skip
    (again,) = [json.loads(line) for line in judged.read_text().splitlines()]
    assert 0 <= again["judge"]["searched"] <= 1 and again["judge_name"] == "shapes-judge"
    assert again["guided"] == row["guided"]  # kept: only rows without it get it from images
    assert len(row["per_prompt"]["searched"]["match"]) == 2


def test_lookahead_variants_spend_48_candidate_forwards(sv) -> None:
    base = sv.VARIANTS["default"][1]
    for name in ("look2", "look4"):
        cfg = sv.VARIANTS[name][1]
        assert cfg.preview_steps > 1 and cfg.forward_rows == base.forward_rows == 48


def test_versus_pairs_a_variant_with_the_default_best_of(sv) -> None:
    def row(name, searched, bestof):
        per = {"searched": {"match": searched}, "bestof": {"match": bestof},
               "random": {"match": bestof}}  # fmt: skip
        return {"variant": name, "per_prompt": per,
                "calls_per_rollout": {"searched": {"transformer_rows": 116}}}  # fmt: skip

    rows = [row("default", [1, 0, 1, 0], [0, 0, 1, 0]), row("look2", [1, 1, 1, 0], [1, 0, 0, 0])]
    text = sv.versus(rows)
    assert "| look2 | 116 | 0.75 / 0.25 (" in text  # look2's searched vs default's best-of
    assert "| default | 116 | 0.50 / 0.25 (" in text
    assert sv.versus(rows[1:]) == ""


def test_rejudge_needs_a_judge_and_images(sv, tmp_path) -> None:
    with pytest.raises(SystemExit) as exc:
        sv.main(["--prompt-seed", "1", "--rejudge", str(tmp_path / "x.jsonl"),
                 "--out", str(tmp_path / "y.jsonl")])  # fmt: skip
    assert exc.value.code == 2
