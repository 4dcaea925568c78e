"""train.evaluate (ODE samples from fixed noise, scored) and ``smartgrpo-fast eval``."""

from __future__ import annotations

import inspect
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import assert_close, assert_float_order_close
from PIL import Image

from smartgrpo_fast import models, rewards
from smartgrpo_fast.cli import main
from smartgrpo_fast.ops import philox_normal
from smartgrpo_fast.sde import flow_sigmas, ode_step
from smartgrpo_fast.shapes import sample_prompts
from smartgrpo_fast.train.evaluate import (
    EvalConfig,
    EvalResult,
    evaluate,
    paired_comparison,
    result_dict,
    reward_labels,
    save_grid,
)


class FakeModel:
    """A cheap FlowModel: velocity = z / 2 - len(prompt) / 100, decode = sigmoid (3, 4, 4)."""

    latent_shape = (3, 4, 4)
    device = torch.device("cpu")

    def __init__(self, time_shift: float = 1.0) -> None:
        self.time_shift = time_shift

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        return torch.tensor([float(len(p)) for p in prompts])

    def velocity(self, z: torch.Tensor, t: float, cond: torch.Tensor, k: int = 1):
        return z * 0.5 - cond.repeat_interleave(k).view(-1, 1, 1, 1) / 100

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x)


class FakeReward:
    """Mean pixel; NaN for prompts containing 'nan', +inf for 'inf'; matches: (N, 2), the
    first attribute = pixel mean > 0.5, the second = prompt has an even length."""

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        r = images.flatten(1).mean(1)
        bad = {"nan": float("nan"), "inf": float("inf")}
        for i, p in enumerate(prompts):
            for word, value in bad.items():
                if word in p:
                    r[i] = value
        return r

    def matches(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        even = torch.tensor([len(p) % 2 == 0 for p in prompts])
        return torch.stack([images.flatten(1).mean(1) > 0.5, even], dim=1)


class PlainReward(FakeReward):
    matches = None  # no matches method: EvalResult.matches is None


PROMPTS = ["a", "bb", "ccc", "dddd", "eeeee"]


def hand_ode(
    model, prompts: list[str], seed: int, steps: int, shift: float, m: int = 1
) -> torch.Tensor:
    """The evaluation computed step by step: noise (row i, candidate j) for image j of prompt
    i, prompt-major, Euler along flow_sigmas, decode: (N*M, ...)."""
    x = philox_normal((len(prompts), m, *model.latent_shape), seed=seed, round=0).flatten(0, 1)
    cond = model.encode_prompts([p for p in prompts for _ in range(m)])
    for s, s_next in itertools.pairwise(flow_sigmas(steps, shift).tolist()):
        x = ode_step(x, model.velocity(x, s, cond), s, s_next)
    return model.decode(x)


@pytest.mark.parametrize("batch", [1, 2, 5, 64])
@pytest.mark.parametrize("shift", [None, 1.0, 3.0])
def test_evaluate_is_the_ode_from_noise_row_i(batch: int, shift: float | None) -> None:
    model, reward = FakeModel(time_shift=2.0), FakeReward()
    res = evaluate(model, reward, PROMPTS, EvalConfig(steps=3, seed=7, batch=batch, shift=shift))
    images = hand_ode(model, PROMPTS, 7, 3, 2.0 if shift is None else shift)
    assert res.shift == (2.0 if shift is None else shift)
    assert res.prompts == PROMPTS and res.images.shape == (5, 3, 4, 4)
    assert res.rewards.dtype == torch.float32 and res.rewards.shape == (5,)
    # Elementwise float32 arithmetic on the same rows: batching changes nothing here.
    assert_close(res.images, images, atol=1e-6, rtol=1e-6, name="images")
    assert_close(res.rewards, reward(images, PROMPTS), atol=1e-6, rtol=1e-6, name="rewards")
    assert res.seconds >= 0 and res.nonfinite == 0


@pytest.mark.float_order
def test_evaluate_is_deterministic_and_keyed_by_seed() -> None:
    model, reward = FakeModel(), FakeReward()
    a = evaluate(model, reward, PROMPTS, EvalConfig(steps=2, seed=3))
    b = evaluate(model, reward, PROMPTS, EvalConfig(steps=2, seed=3))
    c = evaluate(model, reward, PROMPTS, EvalConfig(steps=2, seed=4))
    assert torch.equal(a.rewards, b.rewards) and torch.equal(a.images, b.images)
    assert not torch.allclose(a.images, c.images)
    # Prompt i keeps its noise row when prompts are appended: results are per index.
    d = evaluate(model, reward, [*PROMPTS, "ffffff"], EvalConfig(steps=2, seed=3))
    assert_float_order_close(d.rewards[:5], a.rewards, name="rewards of the first 5 prompts")


@pytest.mark.float_order
@pytest.mark.parametrize("batch", [1, 4, 15, 64])
def test_images_per_prompt_are_prompt_major_and_averaged(batch: int) -> None:
    """M = 3: image j of prompt i is the ODE from noise (i, j), rows i*M + j; the prompt's
    reward is its images' mean; image 0 of each prompt is the M = 1 evaluation's image."""
    model, reward, m = FakeModel(time_shift=2.0), FakeReward(), 3
    res = evaluate(model, reward, PROMPTS, EvalConfig(steps=3, seed=7, batch=batch,
                                                      images_per_prompt=m))  # fmt: skip
    images = hand_ode(model, PROMPTS, 7, 3, 2.0, m)
    assert res.images.shape == (15, 3, 4, 4) and res.images_per_prompt == m
    assert_close(res.images, images, atol=1e-6, rtol=1e-6, name="images")
    per_image = reward(images, [p for p in PROMPTS for _ in range(m)])
    assert res.image_rewards is not None and res.image_rewards.shape == (15,)
    assert_close(res.image_rewards, per_image, atol=1e-6, rtol=1e-6, name="image rewards")
    assert res.rewards.shape == (5,)
    assert_close(res.rewards, per_image.view(5, m).mean(1), atol=1e-6, rtol=1e-6, name="means")
    assert not torch.allclose(images[0::m], images[1::m])  # the M noises differ
    one = evaluate(model, reward, PROMPTS, EvalConfig(steps=3, seed=7, batch=batch))
    assert one.image_rewards is None
    assert_float_order_close(res.images[0::m], one.images, name="image 0 of each prompt")
    assert res.grid_nrow == 6 and one.grid_nrow == 8  # whole prompts on each grid row
    assert res.matches is not None and res.matches.shape == (15,)
    want = reward.matches(images, [p for p in PROMPTS for _ in range(m)]).all(dim=1)
    assert torch.equal(res.matches, want)
    assert res.match_rate == pytest.approx(float(want.double().mean()))
    out = result_dict(res, EvalConfig(images_per_prompt=m), base=res)
    assert out["config"]["eval"]["images_per_prompt"] == m
    assert len(out["reward_images"]) == 15 and len(out["reward_images_base"]) == 15
    assert len(out["reward"]) == 5 and len(out["match"]) == 15
    with pytest.raises(ValueError, match="b: expected 3 images per prompt like a, got 1"):
        paired_comparison(res, one)


def test_images_per_prompt_nonfinite_image_makes_its_prompt_nan() -> None:
    model, reward = FakeModel(), FakeReward()
    prompts = ["a", "nan here", "bb"]
    with pytest.warns(RuntimeWarning, match=r"1 of 3 rewards are not finite \(2 of 6 images\)"):
        res = evaluate(model, reward, prompts, EvalConfig(steps=2, images_per_prompt=2))
    assert res.nonfinite == 1 and math.isnan(res.rewards[1])
    assert res.image_rewards is not None and int(res.image_rewards.isnan().sum()) == 2
    assert res.mean == pytest.approx(float(res.rewards[[0, 2]].double().mean()))


def test_evaluate_runs_the_transformer_in_eval_mode() -> None:
    """Dropout off during the evaluation (a noisy velocity would change the images), the
    training mode restored after."""

    class WithDropout(FakeModel):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = torch.nn.Dropout(0.5)

        def velocity(self, z, t, cond, k=1):
            return self.transformer(super().velocity(z, t, cond, k))

    model, reward = WithDropout(), FakeReward()
    model.transformer.train()
    res = evaluate(model, reward, PROMPTS, EvalConfig(steps=3))
    assert model.transformer.training
    model.transformer.eval()
    assert_close(res.images, hand_ode(model, PROMPTS, 0, 3, 1.0), atol=1e-6, rtol=1e-6)


def test_match_rate_from_matches() -> None:
    model, reward = FakeModel(), FakeReward()
    res = evaluate(model, reward, PROMPTS, EvalConfig(steps=2, batch=2))
    want = reward.matches(res.images, PROMPTS).all(dim=1)
    assert res.matches is not None and res.matches.dtype == torch.bool
    assert torch.equal(res.matches, want)
    assert res.match_rate == pytest.approx(float(want.double().mean()))
    assert 0 < res.match_rate < 1  # both outcomes occur, so the test can tell them apart
    assert res.summary()["match_rate"] == res.match_rate
    plain = evaluate(model, PlainReward(), PROMPTS, EvalConfig(steps=2))
    assert plain.matches is None and plain.match_rate is None


def test_nonfinite_rewards_are_nan_counted_and_left_out() -> None:
    model, reward = FakeModel(), FakeReward()
    prompts = ["a", "nan here", "bb", "inf there", "ccc"]
    with pytest.warns(RuntimeWarning, match="2 of 5 rewards are not finite"):
        res = evaluate(model, reward, prompts, EvalConfig(steps=2, batch=2))
    assert res.nonfinite == 2
    assert math.isnan(res.rewards[1]) and math.isnan(res.rewards[3])  # inf is kept as NaN
    finite = res.rewards[[0, 2, 4]].double()
    assert res.mean == pytest.approx(float(finite.mean()))
    assert res.std == pytest.approx(float(finite.std()))
    out = result_dict(res, EvalConfig(steps=2, batch=2))
    assert out["reward"][1] is None and out["nonfinite"] == 2  # JSON has no NaN: null
    json.dumps(out, allow_nan=False)


def test_all_rewards_nonfinite_gives_nan_mean() -> None:
    with pytest.warns(RuntimeWarning):
        res = evaluate(FakeModel(), FakeReward(), ["nan"], EvalConfig(steps=1))
    assert math.isnan(res.mean) and math.isnan(res.std) and res.nonfinite == 1


def _result(rewards: list[float], prompts: list[str] | None = None) -> EvalResult:
    n = len(rewards)
    return EvalResult(prompts or [str(i) for i in range(n)], torch.tensor(rewards),
                      torch.zeros(n, 3, 2, 2), None, 0.0, 1.0)  # fmt: skip


def test_paired_comparison_skips_nonfinite_pairs() -> None:
    a = _result([1.0, 2.0, float("nan"), 4.0])
    b = _result([0.0, 0.0, 0.0, float("nan")])
    s = paired_comparison(a, b)
    assert s["n"] == 2 and s["excluded"] == 2
    assert s["mean_diff"] == pytest.approx(1.5) and s["win_rate"] == 1.0
    with pytest.raises(ValueError, match="b: expected the same prompts"):
        paired_comparison(a, _result([0.0] * 4, ["x"] * 4))


def test_result_dict_with_base() -> None:
    a, b = _result([1.0, 2.0, 4.0]), _result([0.0, 1.0, 1.0])
    out = result_dict(a, EvalConfig(), base=b, meta={"model": "m"}, extra={"version": "v"})
    assert out["config"]["eval"] == {"steps": 20, "seed": 0, "batch": 32, "shift": 1.0,
                                     "images_per_prompt": 1}  # fmt: skip
    assert "reward_images" not in out and "reward_images_base" not in out
    assert out["config"]["model"] == "m" and out["version"] == "v"
    assert out["reward"] == [1.0, 2.0, 4.0] and out["reward_base"] == [0.0, 1.0, 1.0]
    s = out["summary"]
    assert s["reward"]["mean"] == pytest.approx(7 / 3) and s["reward_base"]["n"] == 3
    assert s["adapter_vs_base"]["mean_diff"] == pytest.approx(5 / 3)
    assert out["match"] is None and out["match_rate"] is None
    assert set(out["seconds"]) == {"eval", "base"}


@pytest.mark.parametrize(
    "kw, match",
    [(dict(steps=0), "steps: expected an integer >= 1"), (dict(steps=2.0), "steps"),
     (dict(batch=0), "batch: expected an integer >= 1"), (dict(seed=-1), "seed: expected 0"),
     (dict(seed=2**62), "seed"), (dict(seed=True), "seed: expected an integer"),
     (dict(shift=0.0), "shift: expected a finite"), (dict(shift=float("inf")), "shift"),
     (dict(images_per_prompt=0), "images_per_prompt: expected an integer >= 1, got 0"),
     (dict(images_per_prompt=True), "images_per_prompt: expected an integer")],
)  # fmt: skip
def test_eval_config_errors(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EvalConfig(**kw)


def test_evaluate_input_errors() -> None:
    model, reward = FakeModel(), FakeReward()
    for bad in ("a prompt", [], ["a", 3]):
        with pytest.raises(TypeError, match="prompts: expected"):
            evaluate(model, reward, bad)
    with pytest.raises(TypeError, match="config: expected an EvalConfig"):
        evaluate(model, reward, ["a"], {"steps": 2})
    with pytest.raises(ValueError, match=r"reward: expected \(2,\) rewards, got \(2, 1\)"):
        evaluate(model, lambda im, p: torch.zeros(len(p), 1), ["a", "b"], EvalConfig(steps=1))

    class BadMatches(FakeReward):
        def matches(self, images, prompts):
            return torch.ones(len(prompts), 2)

    with pytest.raises(ValueError, match=r"reward.matches: expected an \(1, A\).*float32"):
        evaluate(model, BadMatches(), ["a"], EvalConfig(steps=1))


@pytest.mark.parametrize(
    "n, nrow, size, want",
    # want: (tile, rows, cols); the grid is the tiny model's (label column 270, padding 4).
    [(5, 2, 32, (128, 3, 2)), (1, 8, 32, (128, 1, 8)), (4, 4, 256, (128, 1, 4)),
     (3, 2, 50, (100, 2, 2))],
)  # fmt: skip
def test_save_grid_layout(tmp_path: Path, n: int, nrow: int, size: int, want: tuple) -> None:
    g = torch.Generator().manual_seed(0)
    colors = torch.rand(n, 3, 1, 1, generator=g)
    images = colors.expand(n, 3, size, size).contiguous()
    path = save_grid(images, tmp_path / "sub" / "g.png", nrow=nrow)
    tile, rows, cols = want
    with Image.open(path) as im:
        assert im.size == (270 + cols * (tile + 4), rows * (tile + 4))
        for i in range(n):  # each tile's centre has its image's colour
            r, c = divmod(i, nrow)
            px = im.getpixel((270 + c * (tile + 4) + tile // 2, r * (tile + 4) + tile // 2))
            expect = tuple(round(float(v) * 255) for v in colors[i].flatten())
            assert max(abs(a - b) for a, b in zip(px, expect, strict=True)) <= 1
        if n % nrow:  # the padding tiles are white
            assert im.getpixel((270 + (cols - 1) * (tile + 4) + 2, (rows - 1) * (tile + 4) + 2)) \
                == (255, 255, 255)  # fmt: skip


def test_save_grid_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"images: expected \(N, 3, H, W\).*\(3, 4, 4\)"):
        save_grid(torch.zeros(3, 4, 4), tmp_path / "g.png")
    with pytest.raises(ValueError, match="nrow: expected an integer >= 1, got 0"):
        save_grid(torch.zeros(2, 3, 4, 4), tmp_path / "g.png", nrow=0)
    with pytest.raises(ValueError, match="labels: expected 1 row labels, got 2"):
        save_grid(torch.zeros(2, 3, 4, 4), tmp_path / "g.png", labels=["a", "b"])


def test_reward_labels() -> None:
    """A row's label: its images' index range and the mean of their finite rewards."""
    r = torch.tensor([1.0, 2.0, 3.0, float("nan"), 5.0, float("inf")])
    assert reward_labels(r, 2) == ["0-1: reward 1.500", "2-3: reward 3.000", "4-5: reward 5.000"]
    assert reward_labels(r, 4) == ["0-3: reward 2.000", "4-5: reward 5.000"]
    assert reward_labels(torch.tensor([0.25, float("nan")]), 1) == [
        "0: reward 0.250",
        "1: reward n/a",
    ]
    with pytest.raises(ValueError, match="rewards: expected a non-empty \\(N,\\) tensor"):
        reward_labels(torch.zeros(2, 2), 2)
    with pytest.raises(ValueError, match="nrow: expected an integer >= 1"):
        reward_labels(r, 0)


# ---------------------------------------------------------------------- the embedded model


@pytest.fixture(scope="module")
def tiny():
    return models.load("tiny"), rewards.load("tiny")


@pytest.mark.float_order
def test_evaluate_tiny_batch_independent(tiny) -> None:
    """Batch 1, 3 and all give the same rewards: the noise is keyed by prompt index. The
    batched transformer is not bitwise batch-invariant on CPU: measured max differences
    4e-5 on rewards (magnitude ~10, 34 roundings), 5e-6 on images (42 roundings)."""
    model, reward = tiny
    prompts = sample_prompts(4, 1000)
    res = {b: evaluate(model, reward, prompts, EvalConfig(steps=2, batch=b)) for b in (1, 3, 4)}
    for b in (1, 3):
        assert_float_order_close(res[b].images, res[4].images, name=f"images b={b}")
        assert_float_order_close(res[b].rewards, res[4].rewards, name=f"reward b={b}")
    want = hand_ode(model, prompts[:2], 0, 2, model.time_shift)
    assert_close(res[4].images[:2], want, atol=5e-5, rtol=0, name="images vs by hand")
    matches = reward.matches(res[4].images, prompts).all(dim=1)
    assert torch.equal(res[4].matches, matches)


# ------------------------------------------------------------------------------------ CLI

RESULT_KEYS = {"config", "prompts", "reward", "match", "match_rate", "nonfinite", "summary",
               "seconds", "version"}  # fmt: skip


def test_cli_eval_writes_results(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "ev"
    assert main(["eval", "--num-prompts", "4", "--steps", "2", "--seed", "5",
                 "--device", "cpu", "--out", str(out)]) == 0  # fmt: skip
    res = json.loads((out / "result.json").read_text())
    assert set(res) >= RESULT_KEYS and "reward_base" not in res
    assert res["prompts"] == sample_prompts(4, 1000)  # --prompt-seed 1000: fresh prompts
    assert len(res["reward"]) == 4 and len(res["match"]) == 4
    assert res["match_rate"] == pytest.approx(sum(res["match"]) / 4)
    assert res["config"]["eval"]["steps"] == 2 and res["config"]["eval"]["seed"] == 5
    assert res["config"]["prompt_seed"] == 1000 and res["config"]["lora"] is None
    assert res["summary"]["reward"]["mean"] == pytest.approx(sum(res["reward"]) / 4, rel=1e-6)
    with Image.open(out / "grid.png") as im:
        assert im.width > 300 and im.height >= 128
    printed = capsys.readouterr().out
    assert "prompt-match rate" in printed and "result.json" in printed


def test_cli_eval_images_per_prompt(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--images-per-prompt 2: per-image rewards and matches, per-prompt means; image 0 of
    each prompt is the one-image evaluation's."""
    common = ["--num-prompts", "3", "--steps", "2", "--device", "cpu", "--no-progress"]
    assert main(["eval", *common, "--images-per-prompt", "2", "--out", str(tmp_path / "m2")]) == 0
    assert "3 prompts x 2 images" in capsys.readouterr().err
    assert main(["eval", *common, "--out", str(tmp_path / "m1")]) == 0
    two = json.loads((tmp_path / "m2" / "result.json").read_text())
    one = json.loads((tmp_path / "m1" / "result.json").read_text())
    assert two["config"]["eval"]["images_per_prompt"] == 2 and "reward_images" not in one
    assert len(two["reward_images"]) == 6 and len(two["match"]) == 6 and len(two["reward"]) == 3
    for i in range(3):
        pair = two["reward_images"][2 * i : 2 * i + 2]
        assert two["reward"][i] == pytest.approx(sum(pair) / 2, rel=1e-6)
        assert pair[0] == pytest.approx(one["reward"][i], abs=5e-4)  # batch of 6 vs 3 rows
    assert two["match_rate"] == pytest.approx(sum(two["match"]) / 6)
    with pytest.raises(SystemExit):
        main(["eval", *common, "--images-per-prompt", "0"])
    assert "--images-per-prompt" in capsys.readouterr().err


def _has_lora_loading() -> bool:
    pytest.importorskip("peft")
    from smartgrpo_fast.shapes import TinyFlowModel

    return "lora" in inspect.signature(TinyFlowModel.from_pretrained).parameters


def test_cli_eval_lora_against_base(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A perturbed adapter: both sides on the same prompts and noise, paired stats present;
    the base side equals an evaluation without --lora."""
    if not _has_lora_loading():
        pytest.skip("models.load has no lora= yet")
    from smartgrpo_fast.models.lora import LoraSpec, attach_lora, save_adapter

    model = models.load("tiny")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in attach_lora(model, LoraSpec(rank=4, alpha=8.0)):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    adapter = save_adapter(model, tmp_path / "adapter")
    common = ["--num-prompts", "3", "--steps", "2", "--prompt-seed", "1001"]
    assert main(["eval", *common, "--lora", str(adapter), "--out", str(tmp_path / "a")]) == 0
    assert main(["eval", *common, "--out", str(tmp_path / "b")]) == 0
    res = json.loads((tmp_path / "a" / "result.json").read_text())
    plain = json.loads((tmp_path / "b" / "result.json").read_text())
    assert res["config"]["lora"] == str(adapter)
    assert len(res["reward_base"]) == 3 and len(res["match_base"]) == 3
    torch.testing.assert_close(torch.tensor(res["reward_base"]), torch.tensor(plain["reward"]))
    assert res["reward"] != res["reward_base"]  # the adapter changes the samples
    paired = res["summary"]["adapter_vs_base"]
    assert paired["n"] == 3 and paired["excluded"] == 0
    diff = torch.tensor(res["reward"], dtype=torch.float64) - torch.tensor(res["reward_base"])
    assert paired["mean_diff"] == pytest.approx(float(diff.mean()), rel=1e-5)
    assert {"reward", "reward_base", "adapter_vs_base"} <= set(res["summary"])
    assert (tmp_path / "a" / "grid_base.png").is_file()
    assert "paired t" in capsys.readouterr().out

    ckpt = tmp_path / "checkpoints" / "step-000010"  # a trainer checkpoint: adapter/ inside
    save_adapter(model, ckpt / "adapter")
    assert main(["eval", *common, "--lora", str(ckpt), "--no-base",
                 "--out", str(tmp_path / "c")]) == 0  # fmt: skip
    alone = json.loads((tmp_path / "c" / "result.json").read_text())
    assert "reward_base" not in alone and "adapter_vs_base" not in alone["summary"]
    assert alone["config"]["lora"] == str(ckpt / "adapter")
    torch.testing.assert_close(torch.tensor(alone["reward"]), torch.tensor(res["reward"]))


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--lora", "/nonexistent/adapter"], "argument --lora: /nonexistent/adapter does not"),
        (["--no-base"], "argument --no-base: only with --lora"),
        (["--prompts", "/nonexistent/prompts.txt"], "is not a file"),
        (["--model", "/some/folder"], "give --prompt, --prompts or --num-prompts"),
        (["--steps", "0"], "--steps: expected an integer >= 1"),
        (["--shift", "-1"], "shift: expected a finite value > 0"),
        (["--reward", "nope"], "argument --reward: expected reward names of"),
    ],
)
def test_cli_eval_errors(extra: list[str], match: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["eval", *extra])
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the usage: one line
    assert last.startswith("smartgrpo-fast eval: error:") and match in last


def test_cli_eval_lora_folder_without_adapter(tmp_path: Path, capsys) -> None:
    if not _has_lora_loading():
        pytest.skip("models.load has no lora= yet")
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--num-prompts", "1", "--steps", "1", "--lora", str(tmp_path)])
    assert exc.value.code == 2 and "adapter_config.json" in capsys.readouterr().err


def test_cli_eval_run_uses_the_runs_reward_and_the_judge(tmp_path: Path, capsys) -> None:
    """eval --run RUN: the newest checkpoint's adapter, scored by the reward the run trained on
    (tiny-prob here, not eval's default tiny) and by the analytic judge on the same images;
    result.json names both. A trainer checkpoint as --lora reads the same run defaults."""
    from smartgrpo_fast.train.config import load_config
    from smartgrpo_fast.train.trainer import GRPOTrainer

    run = tmp_path / "run"
    cfg = load_config("tiny", [
        "reward=tiny-prob", "sample.prompts_per_step=2", "sample.group_size=2", "sample.steps=3",
        "sample.sde_window_range=[1, 3]", "search.k=2", "search.rounds=1", "search.top=1",
        "train.steps=1", "eval.every=0", "log.progress=false", "log.tensorboard=false",
        "lora.rank=2", "lora.alpha=4", "device=cpu", "train.lr=0.05",
    ])  # fmt: skip
    GRPOTrainer(cfg, run).train()
    common = ["--num-prompts", "3", "--steps", "2", "--prompt-seed", "1001", "--no-progress"]
    assert main(["eval", "--run", str(run), *common, "--out", str(tmp_path / "a")]) == 0
    res = json.loads((tmp_path / "a" / "result.json").read_text())
    c = res["config"]
    assert c["run"] == str(run) and c["reward"] == "tiny-prob" and c["judge"] == "shapes-judge"
    assert c["lora"] == str(run / "checkpoints" / "step-000001" / "adapter")
    judge = res["judge"]
    assert judge["name"] == "shapes-judge"
    assert len(judge["reward"]) == len(judge["reward_base"]) == 3
    assert {"reward", "reward_base", "adapter_vs_base"} <= set(judge["summary"])
    assert judge["match_rate"] is not None
    out = capsys.readouterr().out
    assert "-- tiny-prob" in out and "-- shapes-judge (judge)" in out
    # the reward is tiny-prob's: the same as naming it and the checkpoint explicitly
    ckpt = run / "checkpoints" / "step-000001"
    assert main(["eval", "--lora", str(ckpt), "--reward", "tiny-prob", "--judge", "none",
                 *common, "--out", str(tmp_path / "b")]) == 0  # fmt: skip
    plain = json.loads((tmp_path / "b" / "result.json").read_text())
    assert "judge" not in plain and plain["config"]["run"] == str(run)
    assert plain["reward"] == res["reward"] and plain["reward_base"] == res["reward_base"]
    # the judge's values are the judge's on those images
    assert main(["eval", "--lora", str(ckpt), "--reward", "shapes-judge", *common,
                 "--out", str(tmp_path / "c")]) == 0  # fmt: skip
    judged = json.loads((tmp_path / "c" / "result.json").read_text())
    assert judged["config"]["judge"] is None  # auto: the reward is the judge already
    assert judged["reward"] == judge["reward"] and judged["reward_base"] == judge["reward_base"]
    # a checkpoint as --lora alone: the run's reward by default
    assert main(["eval", "--lora", str(ckpt), *common, "--out", str(tmp_path / "d")]) == 0
    alone = json.loads((tmp_path / "d" / "result.json").read_text())
    assert alone["config"]["reward"] == "tiny-prob" and alone["reward"] == res["reward"]


def test_cli_eval_run_errors(tmp_path: Path, capsys) -> None:
    for extra, match in (
        (["--run", str(tmp_path / "nope")], "argument --run: "),
        (["--run", str(tmp_path)], "config.yaml not found"),
        (["--judge", "nope"], "argument --judge: expected reward names"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(["eval", "--num-prompts", "1", "--steps", "1", "--out", str(tmp_path / "o"),
                  *extra])  # fmt: skip
        assert exc.value.code == 2
        assert match in capsys.readouterr().err.strip().splitlines()[-1]
