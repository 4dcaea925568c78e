"""``bench preview`` (issue 21): rank agreement of a cheap preview's rewards with the expensive
ones, on the embedded model (lookahead rows only, the decoder rows skipped with a note) and on
the tiny random SD3 pipeline with a random TAESD3-layout preview decoder. No timing asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from smartgrpo_fast.bench import preview
from smartgrpo_fast.cli import main

SMALL = ["--batch", "2", "--k", "4", "--top", "2", "--steps", "4", "--step", "1",
         "--repeats", "1", "--warmup", "0", "--device", "cpu"]  # fmt: skip


def test_rank_agreement() -> None:
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    b = torch.tensor([[10.0, 20.0, 30.0, 40.0], [4.0, 3.0, 2.0, 1.0]])
    got = preview.rank_agreement(a, b, top=2)
    assert got["spearman"].tolist() == pytest.approx([1.0, -1.0])
    assert got["top_overlap"].tolist() == [1.0, 0.0]
    nan = torch.tensor([[float("nan"), 2.0, 3.0, 1.0]])  # NaN ranks last
    assert preview.spearman_rows(nan, torch.tensor([[0.0, 2.0, 3.0, 1.0]])).item() == pytest.approx(
        1
    )
    assert preview.top_overlap_rows(a[:1], torch.tensor([[4.0, 3.0, 2.0, 5.0]]), 2).item() == 0.5


def _run(tmp_path: Path, capsys, *argv: str) -> tuple[list[dict], str, str]:
    assert main(["bench", "preview", *SMALL, "--out", str(tmp_path), *argv]) == 0
    out = capsys.readouterr()
    (json_file,) = tmp_path.glob("preview_*.json")
    return json.loads(json_file.read_text()), out.out, out.err


def test_embedded_model_lookahead_rows(tmp_path: Path, capsys) -> None:
    rows, printed, err = _run(tmp_path, capsys, "--preview-steps", "3")
    assert "note: decoder rows skipped: the embedded model works in pixel space" in err
    paths = {r["provider"] for r in rows}
    assert paths == {"lookahead m=1", "lookahead m=3", "final"}
    for p in ("lookahead m=1", "lookahead m=3"):
        sp = next(r for r in rows if r["provider"] == p and r["metric"] == "spearman")
        ov = next(r for r in rows if r["provider"] == p and r["metric"] == "top_overlap")
        assert sp["unit"] == "vs final" and -1 <= sp["median"] <= 1
        assert 0 <= ov["median"] <= 1
    assert all(r["median"] > 0 for r in rows if r["metric"] == "time_per_candidate")
    assert "lookahead m=3" in printed and "spearman" in printed


def test_sd3_tiny_decoder_rows(tmp_path: Path, capsys) -> None:
    pytest.importorskip("diffusers")
    rows, _, _ = _run(tmp_path, capsys, "--model", "sd3-tiny", "--preview-decoder",
                            "random", "--preview-steps", "1")  # fmt: skip
    paths = list(dict.fromkeys(r["provider"] for r in rows))
    assert paths == ["vae", "preview-decoder", "lookahead m=1", "final"]
    sp = next(r for r in rows if r["provider"] == "preview-decoder" and r["metric"] == "spearman")
    assert sp["unit"] == "vs vae"


def test_the_same_decoder_agrees_with_itself(monkeypatch) -> None:
    """A "preview decoder" that is the VAE itself ranks exactly as the VAE: spearman 1."""
    pytest.importorskip("diffusers")
    from smartgrpo_fast.models.sd3 import SD3FlowModel

    monkeypatch.setattr(SD3FlowModel, "decode_preview", SD3FlowModel.decode)
    monkeypatch.setattr(SD3FlowModel, "preview_unscaling",
                        lambda self: (self.scaling_factor, self.shift_factor))  # fmt: skip
    cfg = preview.PreviewBenchConfig(model="sd3-tiny", preview_decoder="random", batch=2, k=4,
                                     top=2, preview_steps=1, steps=4, step=1, repeats=1,
                                     warmup=0)  # fmt: skip
    rows, _ = preview.run(cfg)
    got = {r["metric"]: r["median"] for r in rows if r["provider"] == "preview-decoder"}
    assert got["spearman"] == pytest.approx(1.0) and got["top_overlap"] == 1.0


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="top: expected <= k"):
        preview.PreviewBenchConfig(k=2, top=3)
    with pytest.raises(ValueError, match="'random' is for sd3-tiny and sd35-medium"):
        preview.PreviewBenchConfig(preview_decoder="random")
