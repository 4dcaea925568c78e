"""A user's mistake in ``smartgrpo-fast train`` (or ``search``) is one line naming the key or
file, exit 2, nothing written; a damaged checkpoint never strands a run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from smartgrpo_fast.cli import main
from smartgrpo_fast.train import checkpoint as ckpt
from smartgrpo_fast.train.config import load_config
from smartgrpo_fast.train.trainer import METRIC_KEYS, GRPOTrainer

#: As tests/test_train.py's: 2 prompts x 4 rollouts, 4 sampling steps, K 4 x 2 rounds, reward
#: tiny (whose prompt grammar and arguments the error cases below exercise).
TINY = [
    "sample.prompts_per_step=2", "sample.group_size=4", "sample.steps=4",
    "sample.sde_window_size=2", "sample.sde_window_range=[0, 3]", "search.k=4",
    "search.rounds=2", "search.top=2", "train.steps=2", "train.save_every=1", "eval.every=0",
    "eval.num_prompts=4", "eval.steps=2", "log.progress=false", "log.tensorboard=false",
    "lora.rank=4", "lora.alpha=8", "device=cpu", "reward=tiny",
]  # fmt: skip


def _one_error_line(capsys, prefix: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(prefix), lines[0]
    return lines[0]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ------------------------------------------------------------------------- train: inputs


@pytest.mark.parametrize(
    "case, key, words",
    [
        ("reward=nonsense", "reward", ["expected reward names of", "'nonsense'"]),
        ("reward=tiny:1,nope:2", "reward", ["'nope'"]),
        ("empty", "data.prompts", ["no prompts"]),
        ("blank-lines", "data.prompts", ["no prompts"]),
        ("jsonl-no-prompt", "data.prompts", [":2: expected an object with a 'prompt' string"]),
        ("jsonl-bad-json", "data.prompts", [":1: not valid JSON"]),
        ("missing", "data.prompts", ["prompt file not found"]),
        ("outside-grammar", "data.prompts", ["prompt 1 is 'a red circle'"]),
        ("eval-outside-grammar", "data.eval_prompts", ["reward 'tiny'", "prompt 0"]),
        ("reward_args.nonsense=1", "reward_args", ["tiny", "nonsense"]),
    ],
)
def test_train_input_errors_are_one_line(tmp_path, capsys, case, key, words) -> None:
    good = "a red circle on a blue background"
    files = {
        "empty": ("p.txt", ""),
        "blank-lines": ("p.txt", "\n  \n\n"),
        "jsonl-no-prompt": ("p.jsonl", json.dumps({"prompt": good}) + "\n" + '{"text": "x"}\n'),
        "jsonl-bad-json": ("p.jsonl", "{not json\n"),
        "outside-grammar": ("p.txt", f"{good}\na red circle\n"),
        # 7 words the embedded model reads, but no shape where the reward wants one
        "eval-outside-grammar": ("e.txt", "a red red on a blue background\n"),
    }
    if case in files:
        name, text = files[case]
        path = _write(tmp_path / name, text)
        key_of = "data.eval_prompts" if case.startswith("eval") else "data.prompts"
        override = f"{key_of}={path}"
        words = [str(path), *words]
    elif case == "missing":
        override = f"data.prompts={tmp_path / 'nope.txt'}"
    else:
        override = case
    out = tmp_path / "run"
    assert main(["train", "--config", "tiny", "--out", str(out), *TINY, override]) == 2
    line = _one_error_line(capsys, f"smartgrpo-fast train: error: {key}: ")
    for w in words:
        assert w in line, (w, line)
    assert not out.exists()  # nothing written


def test_config_errors_are_one_line_too(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["train", "--config", "tiny", "--out", str(out), "train.lr=-1"]) == 2
    _one_error_line(capsys, "smartgrpo-fast train: error: train.lr: ")
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    _one_error_line(capsys, "smartgrpo-fast train: error: --resume: ")
    assert not out.exists()


@pytest.mark.parametrize(
    "config, overrides, words",
    [
        ("tiny", ["model.search_dtype=float8"], ["float8 forwards are for SD3 models"]),
        ("tiny", ["model.search_dtype=fp16"], ["expected one of model, float8, got 'fp16'"]),
        ("sd35-medium", ["model.search_dtype=float8", "lora=null", "train.kl_beta=0"],
         ["full fine-tuning (lora: null) needs search_dtype model"]),
        # this machine has no CUDA GPU: refused before any model is built
        ("sd35-medium", ["model.search_dtype=float8"], ["search dtype float8: needs a CUDA GPU",
                                                        "the model is on cpu"]),
    ],
    ids=["tiny", "unknown", "full-fine-tuning", "no-gpu"],
)  # fmt: skip
def test_search_dtype_errors_are_one_line(tmp_path, capsys, config, overrides, words) -> None:
    from helpers import SD35_TINY_STEP

    if torch.cuda.is_available() and any("CUDA" in w for w in words):
        pytest.skip("a CUDA GPU is here")
    out = tmp_path / "run"
    base = SD35_TINY_STEP if config == "sd35-medium" else TINY
    assert main(["train", "--config", config, "--out", str(out), *base, *overrides]) == 2
    line = _one_error_line(capsys, "smartgrpo-fast train: error: model.search_dtype: ")
    for w in words:
        assert w in line, (w, line)
    assert not out.exists()


def test_search_prompt_outside_the_grammar_is_an_argument_error(tmp_path, capsys) -> None:
    """The default ``tiny`` model and reward read only the embedded world's prompts."""
    with pytest.raises(SystemExit) as exit_:
        main(["search", "--prompt", "a red circle", "--out", str(tmp_path / "s")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith("smartgrpo-fast search: error: argument --prompt: prompts: the embedded model")
    )
    # 7 known words pass the model but not the reward's grammar: named as the reward's
    with pytest.raises(SystemExit):
        main(["search", "--prompt", "a red red on a blue background", "--out", str(tmp_path)])
    assert "argument --prompt: prompts: reward 'tiny'" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


# ----------------------------------------------------------------- damaged checkpoints


def _fake_checkpoints(run: Path, steps=(1, 2, 3)) -> None:
    def weights(folder: Path) -> None:
        (folder / "adapter").mkdir()
        save_file({"w": torch.ones(8)}, folder / "adapter" / "adapter_model.safetensors")
        (folder / "adapter" / "adapter_config.json").write_text('{"r": 4}')

    for step in steps:
        ckpt.save_checkpoint(run, step, write_weights=weights, state={"step": step},
                             keep_last=len(steps))  # fmt: skip


def _truncate(path: Path, keep: int | None) -> None:
    data = path.read_bytes()
    path.write_bytes(b"" if keep is None else data[: len(data) // 2 if keep < 0 else keep])


@pytest.mark.parametrize(
    "damage",
    [
        ("training_state.pt", -1),  # truncated to half
        ("training_state.pt", None),  # zero bytes
        ("adapter/adapter_model.safetensors", -1),
        ("adapter/adapter_model.safetensors", None),
        ("adapter/adapter_config.json", 3),
    ],
)
def test_newest_readable_checkpoint_skips_a_damaged_one(tmp_path, damage) -> None:
    _fake_checkpoints(tmp_path)
    name, keep = damage
    bad = ckpt.checkpoint_path(tmp_path, 3) / name
    _truncate(bad, keep)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.read_checkpoint(bad.parent if name == "training_state.pt" else bad.parents[1])
    assert str(err.value).startswith(f"{bad}: ")
    warnings: list[str] = []
    read = ckpt.newest_readable_checkpoint(tmp_path, warn=warnings.append)
    assert read.step == 2 and read.state["step"] == 2
    assert read.folder == ckpt.checkpoint_path(tmp_path, 2)
    assert len(warnings) == 1 and warnings[0].startswith(f"{bad}: ")
    assert f"resuming from {read.folder}" in warnings[0]


def test_no_readable_checkpoint_names_each_damaged_file(tmp_path) -> None:
    _fake_checkpoints(tmp_path, steps=(1, 2))
    first = ckpt.checkpoint_path(tmp_path, 1) / ckpt.STATE_FILE
    second = ckpt.checkpoint_path(tmp_path, 2) / "adapter" / "adapter_model.safetensors"
    _truncate(first, None)
    _truncate(second, -1)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.newest_readable_checkpoint(tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and str(first) in msg and str(second) in msg
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ckpt.newest_readable_checkpoint(tmp_path / "empty")


def _metrics(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    skip = {k for k in METRIC_KEYS if k.startswith("time_")} | {"peak_mem_bytes"}
    return [{k: v for k, v in json.loads(x).items() if k not in skip} for x in lines if x]


@pytest.mark.slow
def test_resume_falls_back_past_a_damaged_checkpoint(tmp_path, capsys, caplog) -> None:
    """A run of 2 steps; step 2's training state truncated: ``--resume`` warns naming it,
    redoes step 2 from checkpoint 1 and gives the same metrics (the resume is exact); with
    every checkpoint damaged it fails in one line naming each file."""
    run = tmp_path / "run"
    GRPOTrainer(load_config("tiny", TINY), run).train()
    before = _metrics(run)
    assert [m["step"] for m in before] == [1, 2]
    state = ckpt.checkpoint_path(run, 2) / ckpt.STATE_FILE
    _truncate(state, -1)
    with caplog.at_level(logging.WARNING, logger="smartgrpo_fast.train.trainer"):
        assert main(["train", "--resume", str(run)]) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith(f"{state}: does not load") for m in warned), warned
    assert _metrics(run) == before
    assert torch.load(state, weights_only=True)["step"] == 2  # rewritten whole
    capsys.readouterr()
    for step in (1, 2):
        _truncate(ckpt.checkpoint_path(run, step) / ckpt.STATE_FILE, None)
    assert main(["train", "--resume", str(run)]) == 2
    line = _one_error_line(capsys, "smartgrpo-fast train: error: resume: no checkpoint of ")
    for step in (1, 2):
        assert str(ckpt.checkpoint_path(run, step) / ckpt.STATE_FILE) in line
