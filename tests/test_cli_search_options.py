"""The options that make ``smartgrpo-fast search`` (and ``eval``) drive an SD3 model: resolution,
guidance, decode size, backend, per-reward loader arguments, the memory-aware default batch,
and one-line argument errors for missing files. SD3 runs use the tiny random pipeline saved
with save_pretrained (models.sd3_configs.save_tiny_sd3_pipeline), on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from smartgrpo_fast.cli import build_parser, main
from smartgrpo_fast.cli.build import (
    CPU_ROWS,
    DECODE_BYTES_PER_PIXEL,
    FORWARD_BYTES_PER_PIXEL,
    MEMORY_FRACTION,
    build_reward,
    default_batch,
    fitting_rows,
)

PROMPTS = ["--prompt", "a red circle on a blue background",
           "--prompt", "a green cross on a white background"]  # fmt: skip
SMALL = ["--k", "2", "--rounds", "1", "--top", "1", "--steps", "2", "--step", "0",
         "--device", "cpu", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("diffusers")
    from smartgrpo_fast.models.sd3_configs import save_tiny_sd3_pipeline

    return save_tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny_sd3"), seed=0)


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run ``argv``, expect an argument error; return its one line (after the usage)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"smartgrpo-fast {argv[0]}: error: "), err
    return last


# --------------------------------------------------------------------------- SD3 options


def test_search_sd3_resolution_guidance_decode_size_backend(
    sd3_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """--resolution 32 (the pipeline's own is 64), --guidance 2, --decode-size 16 and
    --backend graph (off CUDA: eager, with a warning) reach the model and the search; the
    batch follows the CPU rule."""
    out = tmp_path / "o"
    argv = ["search", "--model", str(sd3_dir), *PROMPTS, *SMALL, "--reward", "tiny-color",
            "--resolution", "32", "--guidance", "2", "--decode-size", "16",
            "--backend", "graph", "--out", str(out)]  # fmt: skip
    with pytest.warns(RuntimeWarning, match="running _transformer_forward eagerly"):
        assert main(argv) == 0
    res = json.loads((out / "result.json").read_text())
    assert res["model_options"] == {"resolution": 32, "guidance": 2.0, "backend": "graph",
                                    "dtype": "float32", "reward_args": []}  # fmt: skip
    assert res["config"]["search"]["decode_size"] == 16
    assert res["config"]["rollout"]["batch"] == CPU_ROWS // 2  # B*K <= 16 rows off CUDA
    assert f"note: --batch {CPU_ROWS // 2}: {CPU_ROWS} rows of 32 px" in capsys.readouterr().err


def test_search_sd3_batch_overrides_the_rule(sd3_dir: Path, tmp_path: Path) -> None:
    argv = ["search", "--model", str(sd3_dir), *PROMPTS, *SMALL, "--reward", "tiny-color",
            "--resolution", "32", "--batch", "1", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["config"]["rollout"]["batch"] == 1
    assert res["model_options"]["resolution"] == 32 and res["model_options"]["guidance"] == 1.0


def test_eval_sd3_resolution(sd3_dir: Path, tmp_path: Path) -> None:
    argv = ["eval", "--model", str(sd3_dir), *PROMPTS, "--steps", "1", "--device", "cpu",
            "--reward", "tiny-color", "--resolution", "32", "--no-progress",
            "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["config"]["model_options"]["resolution"] == 32
    assert res["config"]["eval"]["batch"] == CPU_ROWS  # K = 1 row per prompt


def test_sd3_resolution_not_a_multiple_is_an_argument_error(sd3_dir: Path, capsys) -> None:
    last = _error(["search", "--model", str(sd3_dir), *PROMPTS, *SMALL, "--reward",
                   "tiny-color", "--resolution", "30"], capsys)  # fmt: skip
    assert "resolution: expected a multiple of" in last


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--resolution", "64"], "argument --resolution: only for SD3 models"),
        (["--guidance", "0.5"], "argument --guidance: expected a finite number >= 1"),
        (["--backend", "tensorrt"], "argument --backend: invalid choice"),
        (["--decode-size", "0"], "argument --decode-size: expected an integer >= 1"),
        (["--batch", "0"], "argument --batch: expected an integer >= 1"),
    ],
)
def test_model_option_errors(extra: list[str], match: str, capsys) -> None:
    assert match in _error(["search", "--num-prompts", "1", *SMALL, *extra], capsys)


# ------------------------------------------------------------------------- missing files


def test_missing_model_folder(capsys: pytest.CaptureFixture) -> None:
    for command in ("search", "eval"):
        last = _error([command, "--model", "/nonexistent/sd3.5-medium", *PROMPTS], capsys)
        assert last.endswith("argument --model: /nonexistent/sd3.5-medium: no such folder")


def test_model_folder_without_a_pipeline(tmp_path: Path, capsys) -> None:
    pytest.importorskip("diffusers")
    last = _error(["search", "--model", str(tmp_path), *PROMPTS, "--device", "cpu"], capsys)
    assert f"{tmp_path / 'model_index.json'}: not found" in last


def test_missing_reward_checkpoint(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "classifier.safetensors"
    last = _error(["search", "--num-prompts", "1", *SMALL, "--reward-arg",
                   f"tiny.path={missing}"], capsys)  # fmt: skip
    assert "argument --reward: tiny:" in last and str(missing) in last
    assert last.endswith("(the loader's KEY=PATH arguments: --reward-arg tiny.KEY=PATH)")


def test_missing_prompt_file(capsys: pytest.CaptureFixture) -> None:
    last = _error(["search", "--prompts", "/nonexistent/prompts.txt"], capsys)
    assert last.endswith("argument --prompts: /nonexistent/prompts.txt is not a file")


# ---------------------------------------------------------------------------- --reward-arg


@pytest.mark.parametrize(
    "reward, args, match",
    [
        ("tiny", ["foo"], "argument --reward-arg: expected NAME.KEY=VALUE"),
        ("tiny", ["tiny=3"], "argument --reward-arg: expected NAME.KEY=VALUE"),
        ("tiny", [".path=x"], "argument --reward-arg: expected NAME.KEY=VALUE"),
        ("tiny", ["tiny.=x"], "argument --reward-arg: expected NAME.KEY=VALUE"),
        ("tiny", ["tiny.device=cpu"], "the reward's device is set by --device"),
        ("tiny", ["imagereward.checkpoint=x"],
         "argument --reward-arg: 'imagereward.checkpoint=x': 'imagereward' is not a reward of "
         "--reward 'tiny'"),
        ("tiny", ["tiny.path=a", "tiny.path=b"], "argument --reward-arg: tiny.path given twice"),
        ("tiny", ["tiny.nope=1"], "argument --reward-arg: reward 'tiny' does not take 'nope'"),
        ("tiny:1,tiny-color:1", ["tiny-color.checkpoint=x"],
         "argument --reward-arg: reward 'tiny-color' does not take 'checkpoint'"),
        ("tiny", ["tiny.dtype=int8"],
         "argument --reward-arg: 'tiny.dtype=int8': dtype: expected one of bfloat16, float16, "
         "float32"),
    ],
)  # fmt: skip
def test_reward_arg_errors(reward: str, args: list[str], match: str, capsys) -> None:
    argv = ["search", "--num-prompts", "1", *SMALL, "--reward", reward]
    for a in args:
        argv += ["--reward-arg", a]
    assert match in _error(argv, capsys)


@pytest.mark.parametrize(
    "text, dtype",
    [
        ("bf16", "bfloat16"),
        ("bfloat16", "bfloat16"),
        ("fp32", "float32"),
        ("torch.float16", "float16"),
    ],
)
def test_reward_arg_dtype_takes_the_config_names(text: str, dtype: str) -> None:
    """--reward-arg NAME.dtype=X takes the names a config's ``reward_args.dtype`` takes
    (rewards.DTYPES, aliases included) and hands the loader a torch.dtype."""
    import torch

    from smartgrpo_fast.cli.args import reward_arg
    from smartgrpo_fast.cli.build import _reward_kwargs

    args = [reward_arg(f"imagereward.dtype={text}")]
    kw = _reward_kwargs(build_parser(), "imagereward", ["imagereward"], args)
    assert kw == {"imagereward": {"dtype": getattr(torch, dtype)}}


def _reward(*argv: str):
    args = build_parser().parse_args(["search", *argv])
    return build_reward(args, "cpu")


def test_reward_arg_reaches_its_loader_only() -> None:
    """Each component gets its own keywords; VALUE is read as YAML."""
    from smartgrpo_fast.rewards.combine import WeightedSum

    alone = _reward("--reward", "tiny-color", "--reward-arg", "tiny-color.min_cover=0.05")
    assert alone.min_cover == 0.05 and isinstance(alone.min_cover, float)
    both = _reward("--reward", "tiny:1,tiny-color:0.5",
                   "--reward-arg", "tiny-color.max_cover=0.5")  # fmt: skip
    assert isinstance(both, WeightedSum) and both.rewards["tiny-color"].max_cover == 0.5
    assert both.rewards["tiny-color"].min_cover == 0.02  # its default: nothing else leaked


# ---------------------------------------------------------------------------- batch rule


def test_default_batch_rule() -> None:
    """B = the largest B <= 32 with B*K rows in MEMORY_FRACTION of the free bytes, at
    side^2 * (decode + forward per pixel) bytes per row (forward twice with guidance)."""
    gib = 2**30
    per_row_1024 = 1024**2 * (DECODE_BYTES_PER_PIXEL + FORWARD_BYTES_PER_PIXEL)
    rows = int(MEMORY_FRACTION * 100 * gib) // per_row_1024
    assert fitting_rows(1024, 100 * gib) == rows == 24
    assert default_batch(16, 1024, 100 * gib) == 1  # 24 rows: one rollout of K = 16
    assert default_batch(4, 1024, 100 * gib) == 6
    assert default_batch(16, 512, 100 * gib) == 98 // 16 == 6
    per_row_cfg = 512**2 * (DECODE_BYTES_PER_PIXEL + 2 * FORWARD_BYTES_PER_PIXEL)
    assert fitting_rows(512, 100 * gib, guidance=True) == int(0.8 * 100 * gib) // per_row_cfg
    assert default_batch(16, 512, 100 * gib, guidance=True) == 5
    assert default_batch(16, 1024, 0) == 1  # never below 1
    assert default_batch(1, 64, 10**15) == 32  # capped
    assert default_batch(1, 64, 10**15, cap=8) == 8
    assert default_batch(16, 1024, None) == 1 and default_batch(2, 1024, None) == CPU_ROWS // 2
    with pytest.raises(ValueError, match="k, cap"):
        default_batch(0, 1024, None)
