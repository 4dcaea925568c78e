"""Rewards read from the image alone (smartgrpo_fast.rewards.image): shapes, dtype and range on
renders of the embedded world, the direction of each on images built to differ in one thing,
prepare/score equal to the call, and clear errors for NaN, out-of-range or misshapen input."""

from __future__ import annotations

import pytest
import torch

from smartgrpo_fast import rewards
from smartgrpo_fast.rewards.image import JpegReward, SaturationReward, ShapeAreaReward
from smartgrpo_fast.shapes.data import COLORS, SHAPES, sample_batch, shape_mask

NAMES = ("shape-area", "saturation", "brightness", "jpeg-compressibility", "jpeg-incompressibility")


def _renders(n: int, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    images, attrs = sample_batch(n, torch.Generator().manual_seed(seed))
    return images, attrs.prompts()


def _disc(radius: float, fg=(0.85, 0.1, 0.1), bg=(0.1, 0.25, 0.85), size: int = 32):
    """(3, size, size): a hard-edged disc of ``radius`` px at the centre."""
    c = torch.arange(size, dtype=torch.float32) + 0.5
    y, x = torch.meshgrid(c, c, indexing="ij")
    inside = ((x - size / 2) ** 2 + (y - size / 2) ** 2 <= radius**2).float()
    return inside * torch.tensor(fg).view(3, 1, 1) + (1 - inside) * torch.tensor(bg).view(3, 1, 1)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n", [1, 7])
def test_shape_dtype_range_and_determinism(name: str, n: int) -> None:
    images, prompts = _renders(n, seed=n)
    reward = rewards.load(name)
    r = reward(images, prompts)
    assert r.shape == (n,) and r.dtype == torch.float32 and bool(torch.isfinite(r).all())
    if name in ("shape-area", "saturation", "brightness"):
        assert bool(((r >= 0) & (r <= 1)).all()), r
    elif name == "jpeg-compressibility":
        assert bool((r < 0).all()), r  # minus a size in kB
    else:
        assert bool((r > 0).all()), r
    assert torch.equal(reward(images, prompts), r)
    # one image scores the same alone as in a batch, and half precision reads the same pixels
    torch.testing.assert_close(reward(images[:1], prompts[:1]), r[:1], atol=0, rtol=0)
    half = reward(images.half(), prompts)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, r, atol=0.02, rtol=0)


def test_shape_area_measures_the_shape() -> None:
    """A disc of radius r covers pi r^2 / 32^2 of the image (hard edges: to a pixel's area);
    a bigger disc scores more, colour and background do not matter, and a blank image is 0."""
    radii = [4.0, 7.0, 10.0, 13.0]
    pairs = [((0.85, 0.1, 0.1), (0.1, 0.25, 0.85)), ((0.95, 0.95, 0.95), (0.05, 0.05, 0.05))]
    reward = rewards.load("shape-area")
    for fg, bg in pairs:
        images = torch.stack([_disc(r, fg, bg) for r in radii])
        got = reward(images, [""] * len(radii))
        want = torch.tensor([float(_disc(r).ne(_disc(0.0)).any(0).float().mean()) for r in radii])
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        assert bool((got.diff() > 0).all())
        assert abs(float(got[2]) - torch.pi * 100 / 1024) < 0.02
    blank = torch.full((2, 3, 32, 32), 0.4)
    assert torch.equal(reward(blank, ["", ""]), torch.zeros(2))


def test_shape_area_ignores_background_noise_and_counts_faint_pixels_in_part() -> None:
    reward = ShapeAreaReward()
    bg = torch.full((1, 3, 32, 32), 0.5)
    noisy = bg + 0.03 * torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    # RGB distance of a noisy pixel: 0.03 x a chi of 3 dof, above low = 0.1 one time in 100
    faint = bg.clone()
    faint[:, 0, 8:24, 8:24] += 0.2  # distance 0.2: halfway from low 0.1 to high 0.3
    got = reward(torch.cat([noisy.clamp(0, 1), faint]), ["", ""])
    assert float(got[0]) < 0.002
    torch.testing.assert_close(got[1], torch.tensor(0.5 * 256 / 1024), atol=1e-5, rtol=0)
    capped = ShapeAreaReward(max_area=0.05)
    assert float(capped(faint, [""])) == pytest.approx(0.05)
    assert float(capped.area(faint)) == pytest.approx(0.125, abs=1e-5)


def test_shape_area_is_the_area_of_every_shape_of_the_world() -> None:
    """Each of the world's shapes, drawn by the renderer's own rule with hard edges at radius
    5, 8 and 11 (its range), scores its mask's share of the image: larger when larger."""
    centre = torch.tensor([16.0])
    fg = torch.tensor(COLORS["yellow"]).view(3, 1, 1)
    bg = torch.tensor(COLORS["purple"]).view(3, 1, 1)
    reward = rewards.load("shape-area")
    for s in range(len(SHAPES)):
        masks = torch.cat([shape_mask(s, centre, centre, torch.tensor([r]), 32).float()
                           for r in (5.0, 8.0, 11.0)])  # fmt: skip
        images = masks[:, None] * fg + (1 - masks[:, None]) * bg
        got = reward(images, [""] * 3)
        torch.testing.assert_close(got, masks.flatten(1).mean(1), atol=1e-6, rtol=0)
        assert bool((got.diff() > 0).all()), (SHAPES[s], got)


def test_saturation_direction() -> None:
    """Grey is 0, a pure colour 1, a palette colour its own (max - min) / max; mixing an image
    with grey lowers it."""
    reward = SaturationReward()
    red = torch.tensor(COLORS["red"]).view(1, 3, 1, 1).expand(1, 3, 8, 8)
    grey = torch.full((1, 3, 8, 8), 0.5)
    pure = torch.zeros(1, 3, 8, 8)
    pure[:, 1] = 1.0
    black = torch.zeros(1, 3, 8, 8)
    got = reward(torch.cat([grey, pure, red, black]), [""] * 4)
    torch.testing.assert_close(got, torch.tensor([0.0, 1.0, 0.75 / 0.85, 0.0]))
    mixes = torch.cat([red * (1 - a) + grey * a for a in (0.0, 0.3, 0.6, 0.9)])
    assert bool((reward(mixes, [""] * 4).diff() < 0).all())


def test_brightness_direction() -> None:
    """The mean of every pixel's channels: black 0, white 1, and a disc of white on black
    its area; mixing with white raises it."""
    reward = rewards.load("brightness")
    black, white = torch.zeros(1, 3, 32, 32), torch.ones(1, 3, 32, 32)
    disc = _disc(9.0, fg=(1.0, 1.0, 1.0), bg=(0.0, 0.0, 0.0)).unsqueeze(0)
    got = reward(torch.cat([black, white, disc]), [""] * 3)
    torch.testing.assert_close(got[:2], torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(got[2], disc[0, 0].mean())
    red = torch.tensor(COLORS["red"]).view(1, 3, 1, 1).expand(1, 3, 32, 32)
    torch.testing.assert_close(reward(red, [""]), torch.tensor([1.05 / 3]))
    white = white.expand(1, 3, 32, 32)
    mixes = torch.cat([red * (1 - a) + white * a for a in (0.0, 0.3, 0.6, 0.9)])
    assert bool((reward(mixes, [""] * 4).diff() > 0).all())


def test_jpeg_rewards_prefer_plain_images_or_busy_ones() -> None:
    """A flat image compresses best, a disc less, noise worst: compressibility ranks them in
    that order, incompressibility in the reverse, and the two are each other's negative."""
    flat = torch.full((1, 3, 32, 32), 0.4)
    disc = _disc(9.0).unsqueeze(0)
    noise = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    images = torch.cat([flat, disc, noise])
    comp = rewards.load("jpeg-compressibility")(images, [""] * 3)
    incomp = rewards.load("jpeg-incompressibility")(images, [""] * 3)
    assert bool((comp.diff() < 0).all()), comp
    assert torch.equal(incomp, -comp)
    # kB of a 32 x 32 JPEG: a header of about 0.6 kB plus the data
    assert 0.3 < -float(comp[0]) < float(incomp[2]) < 5.0
    assert float(JpegReward(quality=20)(noise, [""])) > float(JpegReward()(noise, [""]))


@pytest.mark.parametrize("name", ["shape-area", "saturation", "brightness"])
def test_prepare_then_score_equals_the_call(name: str) -> None:
    reward = rewards.load(name)
    images, prompts = _renders(5, seed=3)
    assert isinstance(reward, rewards.PreparedReward)
    prepared = reward.prepare(prompts)
    assert prepared.complete and not prepared.tensors
    torch.testing.assert_close(reward.score(images, prepared), reward(images, prompts),
                               atol=0, rtol=0)  # fmt: skip
    with pytest.raises(TypeError, match="prepared: expected PreparedPrompts"):
        reward.score(images, prompts)
    with pytest.raises(TypeError, match="prompts: expected a list of strings"):
        reward.prepare("a red circle on a blue background")


def test_jpeg_has_no_graph_safe_score() -> None:
    """Pillow runs on the host: the search scores it by calling it with the prompts."""
    reward = rewards.load("jpeg-compressibility")
    images, prompts = _renders(3)
    bare = rewards.prepare_prompts(reward, prompts)
    assert not bare.complete
    assert torch.equal(rewards.score_prepared(reward, images, bare), reward(images, prompts))


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_is_a_clear_error(name: str) -> None:
    reward = rewards.load(name)
    images, prompts = _renders(3)
    nan = images.clone()
    nan[1, 0, 4, 4] = float("nan")
    with pytest.raises(ValueError, match="images: 1 NaN values"):
        reward(nan, prompts)
    with pytest.raises(ValueError, match="images: expected values in \\[0, 1\\]"):
        reward(images * 2, prompts)
    with pytest.raises(ValueError, match="images: expected shape \\(N, 3, H, W\\)"):
        reward(images[:, :2], prompts)
    with pytest.raises(TypeError, match="images: expected a float tensor"):
        reward((images * 255).to(torch.uint8), prompts)
    with pytest.raises(ValueError, match="prompts: expected 3 prompts"):
        reward(images, prompts[:2])


def test_loader_arguments_and_bad_settings() -> None:
    assert rewards.load("shape-area", max_area=0.4, device="cpu").max_area == 0.4
    assert rewards.load("jpeg-incompressibility", quality=80) == JpegReward(False, 80)
    assert "shape-area" in rewards.check_names("tiny:1,shape-area:2")
    for kwargs, match in [
        ({"low": 0.3, "high": 0.1}, "low, high"),
        ({"low": float("nan")}, "low: expected a finite number"),
        ({"max_area": 0.0}, "max_area: expected a value in \\(0, 1\\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            ShapeAreaReward(**kwargs)
    with pytest.raises(ValueError, match="quality: expected an integer in \\[1, 100\\]"):
        JpegReward(quality=0)
    with pytest.raises(TypeError):
        rewards.load("saturation", threshold=0.2)
