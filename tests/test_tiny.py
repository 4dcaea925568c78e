"""The embedded default: procedural data, the shipped flow model and its rewards."""

from __future__ import annotations

import itertools
import time

import pytest
import torch
from helpers import mismatched_prompts

from smartgrpo_fast import models, rewards
from smartgrpo_fast.sde import sample_ode
from smartgrpo_fast.shapes import (
    COLORS,
    SHAPES,
    TinyArch,
    TinyFlowModel,
    attributes_from_prompt,
    prompt_of,
    sample_batch,
    sample_prompts,
    tokenize,
)
from smartgrpo_fast.shapes.model import build_modules, save_weights
from smartgrpo_fast.shapes.reward import ColorFidelityReward, TinyClassifierReward

pytest.importorskip("diffusers")


# ------------------------------------------------------------------------------ data


def test_batches_are_deterministic_from_a_seed() -> None:
    a, attrs_a = sample_batch(16, torch.Generator().manual_seed(3))
    b, attrs_b = sample_batch(16, torch.Generator().manual_seed(3))
    c, _ = sample_batch(16, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and torch.equal(attrs_a.shape, attrs_b.shape)
    assert not torch.equal(a, c)
    assert a.shape == (16, 3, 32, 32) and float(a.min()) >= 0 and float(a.max()) <= 1


def test_shape_colour_differs_from_background() -> None:
    _, attrs = sample_batch(512, torch.Generator().manual_seed(0))
    assert bool((attrs.color != attrs.background).all())
    assert set(attrs.shape.tolist()) == set(range(len(SHAPES)))


def test_prompts_round_trip_and_use_an_before_vowels() -> None:
    for s in range(len(SHAPES)):
        for c in range(len(COLORS)):
            b = (c + 1) % len(COLORS)
            assert attributes_from_prompt(prompt_of(s, c, b)) == (s, c, b)
    assert prompt_of(0, list(COLORS).index("orange"), 0).startswith("an orange circle")
    prompts = sample_prompts(10, seed=5)
    assert prompts == sample_prompts(10, seed=5) and prompts != sample_prompts(10, seed=6)
    tokenize(prompts)  # every sampled prompt is in the vocabulary


@pytest.mark.parametrize("bad", ["a red circle", "a pink circle on a blue background", ""])
def test_unknown_prompts_are_clear_errors(bad) -> None:
    with pytest.raises(ValueError, match="prompt"):
        attributes_from_prompt(bad)
    with pytest.raises(ValueError, match=r"^prompts: the embedded model reads 7-word prompts"):
        tokenize([bad])


# ----------------------------------------------------------------------------- model


@pytest.fixture(scope="module")
def random_model_dir(tmp_path_factory):
    arch = TinyArch(layers=1, heads=2, head_dim=8)
    transformer, text_encoder = build_modules(arch, seed=0)
    folder = tmp_path_factory.mktemp("tiny_random")
    save_weights(
        folder, transformer, text_encoder, arch, name="flow.safetensors", dtype=torch.float32
    )
    return folder


def test_model_written_by_the_trainer_loads_and_runs(random_model_dir) -> None:
    m = TinyFlowModel.from_pretrained(random_model_dir)
    assert isinstance(m, models.FlowModel) and m.latent_shape == (3, 32, 32)
    cond = m.encode_prompts(sample_prompts(2, seed=0))
    assert cond.prompt_embeds.shape == (2, 7, 64) and cond.pooled.shape == (2, 64)
    z = torch.randn(6, 3, 32, 32)
    v = m.velocity(z, 0.5, cond, k=3)
    assert v.shape == z.shape and torch.isfinite(v).all()
    img = m.decode(z)
    assert img.shape == (6, 3, 32, 32) and float(img.min()) >= 0 and float(img.max()) <= 1
    assert m.decode(z, size=64).shape == (6, 3, 64, 64)


def test_missing_weights_are_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.json: not found"):
        TinyFlowModel.from_pretrained(tmp_path)


@pytest.fixture(scope="module")
def tiny() -> TinyFlowModel:
    start = time.perf_counter()
    model = models.load("tiny")
    print(f"models.load('tiny') took {1e3 * (time.perf_counter() - start):.0f} ms")
    return model


def test_shipped_model_generates_deterministically(tiny) -> None:
    prompts = sample_prompts(4, seed=1)
    cond = tiny.encode_prompts(prompts)
    z = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    a = sample_ode(tiny, cond, z, steps=8)
    b = sample_ode(tiny, cond, z, steps=8)
    assert torch.equal(a, b)
    images = tiny.decode(a)
    assert images.shape == (4, 3, 32, 32) and torch.isfinite(images).all()


def test_shipped_model_follows_its_prompts(tiny) -> None:
    """A quick, loose version of the closing-note measurement: 16 samples, 20 ODE steps."""
    from smartgrpo_fast.shapes.evaluate import generation_accuracy

    report = generation_accuracy(tiny, rewards.load("tiny"), n=16, seed=3, steps=20)
    assert report.color >= 0.75 and report.background >= 0.75, report


# --------------------------------------------------------------------------- rewards


def _real(n: int, seed: int):
    images, attrs = sample_batch(n, torch.Generator().manual_seed(seed))
    prompts = [
        prompt_of(int(s), int(c), int(b))
        for s, c, b in zip(attrs.shape, attrs.color, attrs.background, strict=True)
    ]
    return images, attrs, prompts


@pytest.mark.parametrize("name", ["tiny", "tiny-prob", "tiny-min", "tiny-margin"])
@pytest.mark.parametrize("which", ["shape", "color", "background"])
def test_classifier_reward_ranks_matching_images_first(name, which) -> None:
    reward = rewards.load(name)
    images, attrs, prompts = _real(128, seed=11)
    good = reward(images, prompts)
    bad = reward(images, mismatched_prompts(attrs, which))
    assert good.shape == (128,) and good.dtype == torch.float32
    assert float((good > bad).float().mean()) >= 0.95


@pytest.mark.parametrize("which", ["color", "background"])
def test_colour_fidelity_ranks_matching_images_first(which) -> None:
    reward = rewards.load("tiny-color")
    images, attrs, prompts = _real(128, seed=12)
    good = reward(images, prompts)
    bad = reward(images, mismatched_prompts(attrs, which))
    assert float((good > bad).float().mean()) >= 0.95
    assert float(good.min()) > 0.9  # exact colours, exact proportions


def test_classifier_on_real_images() -> None:
    from smartgrpo_fast.shapes.evaluate import real_image_accuracy

    assert real_image_accuracy(rewards.load("tiny"), n=256) >= 0.97


@pytest.mark.parametrize(
    "images,prompts,exc,match",
    [
        (torch.full((2, 3, 8, 8), float("nan")), ["a", "b"], ValueError, "NaN"),
        (torch.full((2, 3, 8, 8), 1.5), ["a", "b"], ValueError, r"\[0, 1\]"),
        (torch.zeros(2, 1, 8, 8), ["a", "b"], ValueError, r"\(N, 3, H, W\)"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), ["a", "b"], TypeError, "float"),
        (torch.zeros(2, 3, 8, 8), ["a"], ValueError, "2 prompts"),
    ],
)
def test_reward_input_errors(images, prompts, exc, match) -> None:
    for reward in (ColorFidelityReward(), TinyClassifierReward.load()):
        with pytest.raises(exc, match=match):
            reward(images, prompts)


def test_unknown_reward_name() -> None:
    with pytest.raises(ValueError, match=r"^name_or_path: expected one of tiny"):
        rewards.load("imagereward-v2")


def test_image_grid_png(random_model_dir, tmp_path) -> None:
    from PIL import Image

    from smartgrpo_fast.shapes.grid import generate, save_grid

    m = TinyFlowModel.from_pretrained(random_model_dir)
    prompts = sample_prompts(2, seed=0)
    images = generate(m, prompts, [0, 1, 2], steps=3)
    assert images.shape == (2, 3, 3, 32, 32)
    assert torch.equal(images, generate(m, prompts, [0, 1, 2], steps=3))  # seeded
    path = save_grid(images, prompts, tmp_path / "grid.png")
    width, height = Image.open(path).size
    assert height == 2 * (32 * 4 + 4) and width > 3 * 32 * 4


def test_training_runs_and_resumes_to_the_same_weights(tmp_path) -> None:
    """Two chunks of 2 steps end where one run of 4 steps does (the resume state is exact)."""
    from safetensors.torch import load_file

    from smartgrpo_fast.shapes.train_model import FlowTrainConfig, train_flow

    cfg = FlowTrainConfig(steps=4, batch=4, warmup=1)
    arch = TinyArch(layers=1, heads=2, head_dim=8)
    logs: list[str] = []
    train_flow(cfg, arch, out=tmp_path / "once", log=logs.append, checkpoint_every=100)
    train_flow(cfg, arch, out=tmp_path / "chunks", log=logs.append, stop_after=2)
    train_flow(cfg, arch, out=tmp_path / "chunks", log=logs.append)
    assert any("resumed" in line and "step 2" in line for line in logs)
    once = load_file(tmp_path / "once" / "flow_ema.safetensors")
    chunks = load_file(tmp_path / "chunks" / "flow_ema.safetensors")
    assert once.keys() == chunks.keys()
    assert all(torch.equal(once[k], chunks[k]) for k in once)
    model = TinyFlowModel.from_pretrained(tmp_path / "once", weights="flow_ema.safetensors")
    assert model.latent_shape == (3, 32, 32)
    assert model.time_shift == cfg.time_shift  # config.json: sample on the trained schedule


def test_training_times_are_shifted_toward_noise(monkeypatch) -> None:
    """The trainer's t: logit-normal(0, 1) shifted by s t / (1 + (s - 1) t) (SD3's schedule)."""
    from smartgrpo_fast.shapes import train_model as train

    seen: list[torch.Tensor] = []
    real = train.build_modules

    def spy_modules(arch, seed=0):
        transformer, text_encoder = real(arch, seed)
        forward = transformer.forward

        def spy(x_t, h, pooled, timestep, **kw):
            seen.append(timestep / 1000.0)
            return forward(x_t, h, pooled, timestep, **kw)

        transformer.forward = spy
        return transformer, text_encoder

    monkeypatch.setattr(train, "build_modules", spy_modules)
    arch = TinyArch(layers=1, heads=2, head_dim=8)
    for shift in (1.0, 3.0):
        seen.clear()
        train.train_flow(train.FlowTrainConfig(steps=1, batch=512, warmup=1, time_shift=shift),
                         arch, log=lambda _: None)  # fmt: skip
        t = seen[0]
        u = t / (shift - (shift - 1.0) * t)  # undo the shift: logit-normal(0, 1) again
        z = torch.logit(u.double())
        assert abs(float(z.mean())) < 0.15 and abs(float(z.std()) - 1.0) < 0.1
    assert float((t > 0.8).float().mean()) > 0.25  # shifted: high noise drawn often


@pytest.mark.parametrize(
    "kw, match",
    [(dict(time_shift=0.0), "time_shift"), (dict(uncond_prob=1.0), "uncond_prob"),
     (dict(steps=0), "steps"), (dict(decay_fraction=1.5), "decay_fraction")],
)  # fmt: skip
def test_train_config_errors(kw: dict, match: str) -> None:
    from smartgrpo_fast.shapes.train_model import FlowTrainConfig

    with pytest.raises(ValueError, match=match):
        FlowTrainConfig(**kw)


def test_lr_schedule_is_constant_then_decays() -> None:
    from smartgrpo_fast.shapes.train_model import FlowTrainConfig, _lr_factor

    cfg = FlowTrainConfig(steps=1200, warmup=200, decay_fraction=0.25, final_lr_fraction=0.1)
    f = [_lr_factor(s, cfg) for s in range(cfg.steps)]
    assert f[0] == pytest.approx(1 / 200) and f[199] == pytest.approx(1.0)
    assert all(v == 1.0 for v in f[200:950])  # constant until the last 25% of 1000 steps
    assert all(a >= b for a, b in itertools.pairwise(f[950:]))
    assert f[-1] == pytest.approx(0.1, abs=1e-4)


def test_guidance_against_the_null_prompt(random_model_dir) -> None:
    """guidance_scale g > 1: v = v(null) + g (v(prompt) - v(null)), null = all <pad>, in one
    batch; the scale can come from config.json."""
    import json

    plain = TinyFlowModel.from_pretrained(random_model_dir)
    guided = TinyFlowModel.from_pretrained(random_model_dir, guidance_scale=2.5)
    prompts = sample_prompts(2, seed=1)
    cond = guided.encode_prompts(prompts)
    assert cond.has_negative and not plain.encode_prompts(prompts).has_negative
    z = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    v_c = plain.velocity(z, 0.6, plain.encode_prompts(prompts), k=2)
    null_h, null_p = plain.text_encoder(torch.zeros(2, 7, dtype=torch.int64))
    from smartgrpo_fast.models import Cond

    v_u = plain.velocity(z, 0.6, Cond(null_h.detach(), null_p.detach()), k=2)
    torch.testing.assert_close(guided.velocity(z, 0.6, cond, k=2), v_u + 2.5 * (v_c - v_u),
                               atol=1e-5, rtol=1e-5)  # fmt: skip
    meta = json.loads((random_model_dir / "config.json").read_text())
    folder = random_model_dir.parent / "guided"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**meta, "guidance_scale": 3.0}))
    (folder / "flow.safetensors").write_bytes((random_model_dir / "flow.safetensors").read_bytes())
    assert TinyFlowModel.from_pretrained(folder).guidance_scale == 3.0
    with pytest.raises(ValueError, match="guidance_scale: expected a finite value >= 1"):
        TinyFlowModel.from_pretrained(random_model_dir, guidance_scale=0.5)


def test_time_shift_from_config_drives_sampling(random_model_dir, tmp_path) -> None:
    """config.json "time_shift" is the model's schedule: sample_ode and compare_noise use it
    unless given a shift."""
    import json

    from smartgrpo_fast.sde import schedule_shift

    assert TinyFlowModel.from_pretrained(random_model_dir).time_shift == 1.0  # absent: uniform
    meta = json.loads((random_model_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**meta, "time_shift": 3.0}))
    weights = (random_model_dir / "flow.safetensors").read_bytes()
    (tmp_path / "flow.safetensors").write_bytes(weights)
    shifted = TinyFlowModel.from_pretrained(tmp_path)
    assert schedule_shift(shifted) == 3.0
    cond = shifted.encode_prompts(sample_prompts(2, seed=3))
    z = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    default = sample_ode(shifted, cond, z, steps=3)
    torch.testing.assert_close(default, sample_ode(shifted, cond, z, steps=3, shift=3.0))
    assert not torch.allclose(default, sample_ode(shifted, cond, z, steps=3, shift=1.0))
    with pytest.raises(ValueError, match="time_shift: expected a finite value > 0"):
        TinyFlowModel.from_pretrained(tmp_path, time_shift=-1.0)


def test_margin_is_positive_exactly_where_each_attribute_is_read_right() -> None:
    """tiny-margin: per attribute, the prompt's logit over the best other one; its mean over the
    three attributes, and each term > 0 iff matches() reads that attribute right."""
    reward = rewards.load("tiny-margin")
    images, attrs, prompts = _real(64, seed=13)
    bad = mismatched_prompts(attrs, "shape")
    prepared = reward.prepare(bad)
    heads, tgt = reward._heads(images, prepared)
    per = torch.stack([h.gather(1, tgt[:, i : i + 1]).squeeze(1)
                       - h.scatter(1, tgt[:, i : i + 1], float("-inf")).amax(1)
                       for i, h in enumerate(heads)], dim=1)  # fmt: skip
    torch.testing.assert_close(reward(images, bad), per.mean(1), rtol=0, atol=1e-6)
    assert torch.equal(per > 0, reward.matches(images, bad))
    assert float((reward(images, prompts) > 0).float().mean()) >= 0.95
