"""ImageReward on transformers' BLIP classes: loading, batching, errors, and parity.

Parity: ``fixtures/imagereward/`` holds what ``make_fixture.py`` measured once with the original
``image-reward`` 1.5 package (real sizes: ViT-L/16 + BERT-base, ~447 M parameters) on weights
that ``recipe.py`` rebuilds here from a seed and the package's key/shape list.
The small tests use the same key list with 2 layers per encoder and shrunken widths.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_float_order_close
from PIL import Image

from smartgrpo_fast.rewards.base import Reward
from smartgrpo_fast.rewards.imagereward import (
    IGNORED_KEYS,
    ImageRewardModel,
    checkpoint_key,
    convert_imagereward_state_dict,
    load_imagereward,
    load_tokenizer,
    preprocess_images,
    preprocess_pil,
)

FIXTURE = Path(__file__).parent / "fixtures" / "imagereward"
VOCAB = FIXTURE / "vocab"
KEYS = json.loads((FIXTURE / "keys.json").read_text())
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
MED_CONFIG = json.loads((FIXTURE / "med_config.json").read_text())


def _load_recipe():
    spec = importlib.util.spec_from_file_location("imagereward_recipe", FIXTURE / "recipe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


recipe = _load_recipe()

# The real key list with 2 layers per encoder and every size mapped down (vision width
# 1024 -> 128 = 2 heads, its qkv 3072 -> 384 and MLP 4096 -> 256, 197 positions -> 5 = 32 px
# images at patch 16; text width 768 -> 32, BERT MLP 3072 -> 64, vocabulary 30524 -> 200,
# 512 positions -> 64). Key prefix -> {real size: tiny size}.
VISION_SIZES = {1024: 128, 3072: 384, 4096: 256, 197: 5}
TEXT_SIZES = {1024: 128, 768: 32, 3072: 64, 30524: 200, 512: 64}
TINY_MED_CONFIG = {
    **MED_CONFIG,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "vocab_size": 200,
    "max_position_embeddings": 64,
}
PROMPTS = [
    "a red circle on a blue background",
    "A photo of a Cat, sitting on the mat!",
    "a small green house",
    "a tall tree under a bright yellow sun",
]


def _tiny_keys() -> list[list]:
    out = []
    for key, shape, dtype in KEYS:
        m = re.search(r"\.(blocks|layer)\.(\d+)\.", key)
        if m is None or int(m[2]) < 2:
            sizes = VISION_SIZES if key.startswith("blip.visual_encoder.") else TEXT_SIZES
            out.append([key, [sizes.get(d, d) for d in shape], dtype])
    return out


def _tiny_state_dict() -> dict[str, torch.Tensor]:
    return recipe.make_state_dict(_tiny_keys(), seed=7)


def _images(n: int = 4, seed: int = 0, size: tuple[int, int] = (40, 52)) -> torch.Tensor:
    return torch.rand((n, 3, *size), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("imagereward")
    torch.save(_tiny_state_dict(), folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps(TINY_MED_CONFIG))
    return folder / "ImageReward.pt", folder / "med_config.json"


@pytest.fixture(scope="module")
def tiny(tiny_files: tuple[Path, Path]) -> ImageRewardModel:
    return load_imagereward(*tiny_files, tokenizer=VOCAB)


def _fake_hub_cache(root: Path, repo: str, files: dict[str, bytes]) -> None:
    """The Hugging Face cache layout: models--org--name/{refs/main, snapshots/<hash>/...}."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    folder = root / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(revision)
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache that huggingface_hub and transformers use, offline."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


# ------------------------------------------------------------------------- behaviour


def test_scores_shape_dtype_and_determinism(tiny: ImageRewardModel) -> None:
    images = _images()
    scores = tiny(images, PROMPTS)
    assert isinstance(tiny, Reward)
    assert scores.shape == (4,) and scores.dtype == torch.float32
    assert scores.device == images.device and bool(torch.isfinite(scores).all())
    assert torch.equal(scores, tiny(images, PROMPTS))


def test_prepare_then_score_equals_the_call(tiny: ImageRewardModel) -> None:
    """prepare tokenises (fixed (N, 35) ids and mask), score reads tensors only."""
    images = _images()
    prepared = tiny.prepare(PROMPTS)
    assert prepared.tensors["input_ids"].shape == (len(PROMPTS), 35)
    assert prepared.tensors["attention_mask"].shape == (len(PROMPTS), 35)
    want = tiny(images, PROMPTS)
    torch.testing.assert_close(tiny.score(images, prepared), want, atol=0, rtol=0)
    swapped = type(prepared)(("zzz",) * len(PROMPTS), prepared.tensors)
    torch.testing.assert_close(tiny.score(images, swapped), want, atol=0, rtol=0)
    assert tiny.prepare(["a", *PROMPTS[1:]]).signature() == prepared.signature()


@pytest.mark.float_order
def test_batch_equals_one_at_a_time(tiny: ImageRewardModel) -> None:
    images = _images()
    batch = tiny(images, PROMPTS)
    single = torch.cat([tiny(images[i : i + 1], PROMPTS[i : i + 1]) for i in range(4)])
    assert_float_order_close(batch, single, name="one at a time")  # batched GEMMs reorder sums


def test_images_and_prompts_change_the_score(tiny: ImageRewardModel) -> None:
    images = _images()
    base = tiny(images, PROMPTS)
    other_images = tiny(_images(seed=1), PROMPTS)
    other_prompts = tiny(images, PROMPTS[1:] + PROMPTS[:1])
    assert bool(((base - other_images).abs() > 1e-4).all())
    assert bool(((base - other_prompts).abs() > 1e-4).all())


def test_any_image_size_and_dtypes(tiny_files: tuple[Path, Path], tiny: ImageRewardModel) -> None:
    assert tiny.image_size == 32
    for size in [(32, 32), (17, 90), (300, 41)]:
        scores = tiny(_images(2, size=size), PROMPTS[:2])
        assert scores.shape == (2,) and bool(torch.isfinite(scores).all())
    images = _images()
    ref = tiny(images, PROMPTS)
    f64 = load_imagereward(*tiny_files, tokenizer=VOCAB, dtype=torch.float64)
    torch.testing.assert_close(f64(images, PROMPTS), ref, atol=1e-5, rtol=0)
    bf16 = load_imagereward(*tiny_files, tokenizer=VOCAB, dtype=torch.bfloat16)
    out = bf16(images, PROMPTS)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=0.02, rtol=0)  # bf16 encoders: 3e-3 measured


def test_dtype_by_name(tiny_files: tuple[Path, Path], tiny: ImageRewardModel) -> None:
    """A config's ``reward_args: {dtype: bfloat16}`` reaches the loader as a string: the same
    model as ``dtype=torch.bfloat16``; an unknown name is an error naming ``dtype``."""
    from smartgrpo_fast.rewards import reward_from_spec

    kw = {"checkpoint": tiny_files[0], "med_config": tiny_files[1], "tokenizer": VOCAB}
    by_name = reward_from_spec("imagereward", dtype="bfloat16", **kw)
    by_dtype = load_imagereward(*tiny_files, tokenizer=VOCAB, dtype=torch.bfloat16)
    assert by_name.dtype == torch.bfloat16
    images = _images()
    assert torch.equal(by_name(images, PROMPTS), by_dtype(images, PROMPTS))
    assert reward_from_spec("imagereward", dtype="fp32", **kw).dtype == torch.float32
    for bad in ("bfloat", "int8", torch.int8, 16):
        with pytest.raises(ValueError, match=r"^dtype: expected one of bfloat16, float16, "):
            reward_from_spec("imagereward", dtype=bad, **kw)


def test_quantize_and_pil_paths(tiny_files: tuple[Path, Path], tiny: ImageRewardModel) -> None:
    """score_pil is the package's PIL preprocessing; quantize=True emulates it on tensors."""
    quantized = load_imagereward(*tiny_files, tokenizer=VOCAB, quantize=True)
    images = _fixture_images()
    pil = tiny.score_pil(images, PROMPTS)
    tensor = torch.cat(
        [quantized(_as_tensor(img), [p]) for img, p in zip(images, PROMPTS, strict=True)]
    )
    torch.testing.assert_close(tensor, pil, atol=2e-4, rtol=0)  # measured <= 4.2e-5
    x = _images()
    assert torch.equal(quantized(x, PROMPTS), quantized((x * 255).round() / 255, PROMPTS))
    assert not torch.equal(quantized(x, PROMPTS), tiny(x, PROMPTS))


def test_tokenizer_matches_package() -> None:
    tok = load_tokenizer(VOCAB)
    enc = tok(EXPECTED["prompts"], padding="max_length", truncation=True, max_length=35)
    assert enc["input_ids"] == EXPECTED["input_ids"]
    assert enc["attention_mask"] == EXPECTED["attention_mask"]
    assert [tok.bos_token_id, tok.convert_tokens_to_ids("[ENC]")] == EXPECTED["dec_enc_token_ids"]


def test_loads_from_hugging_face_cache(
    tiny_files: tuple[Path, Path], tiny: ImageRewardModel, hub_cache: Path
) -> None:
    ckpt, med = tiny_files
    files = {"ImageReward.pt": ckpt.read_bytes(), "med_config.json": med.read_bytes()}
    _fake_hub_cache(hub_cache, "THUDM/ImageReward", files)
    vocab = {f.name: f.read_bytes() for f in VOCAB.iterdir()}
    _fake_hub_cache(hub_cache, "bert-base-uncased", vocab)
    model = load_imagereward()  # checkpoint, med_config and tokenizer all from the cache
    images = _images()
    assert torch.equal(model(images, PROMPTS), tiny(images, PROMPTS))


# ------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("make", "n_prompts", "error", "match"),
    [
        (lambda x: x.index_fill(2, torch.tensor([3]), float("nan")), 4, ValueError, "NaN"),
        (lambda x: x * 1.5, 4, ValueError, r"\[0, 1\]"),
        (lambda x: x - 0.5, 4, ValueError, r"\[0, 1\]"),
        (lambda x: torch.cat([x, x[:, :1]], 1), 4, ValueError, r"shape \(N, 3, H, W\)"),
        (lambda x: x[0], 4, ValueError, r"shape \(N, 3, H, W\)"),
        (lambda x: (x * 255).to(torch.uint8), 4, TypeError, "float tensor"),
        (lambda x: x, 3, ValueError, "expected 4 prompts"),
    ],
    ids=["nan", "above-1", "below-0", "4-channels", "3d", "uint8", "prompt-count"],
)
def test_bad_inputs(tiny: ImageRewardModel, make, n_prompts: int, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        tiny(make(_images()), PROMPTS[:n_prompts])


def test_missing_files(tmp_path: Path, tiny_files: tuple[Path, Path], hub_cache: Path) -> None:
    ckpt, med = tiny_files
    with pytest.raises(FileNotFoundError, match=r"checkpoint=.*ImageReward\.pt not found"):
        load_imagereward(tmp_path / "nope.pt", med, tokenizer=VOCAB)
    with pytest.raises(FileNotFoundError, match=r"ImageReward\.pt: not in the Hugging Face cache"):
        load_imagereward(tokenizer=VOCAB)
    with pytest.raises(FileNotFoundError, match=r"med_config\.json: .*pass med_config=PATH"):
        load_imagereward(ckpt, tokenizer=VOCAB)
    with pytest.raises(FileNotFoundError, match=r"tokenizer=.*no-vocab"):
        load_imagereward(ckpt, med, tokenizer=tmp_path / "no-vocab")
    with pytest.raises(FileNotFoundError, match=r"neither vocab\.txt nor tokenizer\.json"):
        load_imagereward(ckpt, med, tokenizer=tmp_path)
    with pytest.raises(FileNotFoundError, match="bert-base-uncased"):
        load_imagereward(ckpt, med)  # the default tokenizer is not in the (empty) cache


CROSS_KEY = "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"
QKV = "blip.visual_encoder.blocks.0.attn.qkv"
# id: (keys dropped, entries added, expected message)
CORRUPTIONS = {
    "shape": (
        [CROSS_KEY],
        {CROSS_KEY: torch.zeros(32, 100)},
        re.escape(f"checkpoint['{CROSS_KEY}']: shape (32, 100), but the configuration ")
        + r".* expects \(32, 128\)",
    ),
    "missing-head": (["mlp.layers.7.bias"], {}, r"missing keys mlp\.layers\.7\.bias"),
    "missing-vision": (
        ["blip.visual_encoder.blocks.1.norm2.bias"],
        {},
        r"missing blip\.visual_encoder\.blocks\.1\.norm2\.bias",
    ),
    "renamed": (
        [f"{QKV}.weight"],
        {f"{QKV}x.weight": torch.zeros(384, 128)},
        r"1 unexpected keys: blip\.visual_encoder\.blocks\.0\.attn\.qkvx\.weight",
    ),
    "extra-layer": (
        [],
        {"blip.text_encoder.encoder.layer.2.output.dense.bias": torch.zeros(32)},
        r"unexpected blip\.text_encoder\.encoder\.layer\.2\.output\.dense\.bias",
    ),
    "position-ids": (
        [],
        {"blip.text_encoder.embeddings.position_ids": torch.zeros(1, 64, dtype=torch.long)},
        r"expected arange\(64\) position ids",
    ),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupted_checkpoint(tmp_path: Path, name: str) -> None:
    drop, add, match = CORRUPTIONS[name]
    sd = {k: v for k, v in _tiny_state_dict().items() if k not in drop} | add
    torch.save(sd, tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text(json.dumps(TINY_MED_CONFIG))
    with pytest.raises(ValueError, match=match):
        load_imagereward(tmp_path / "ImageReward.pt", tmp_path / "med_config.json", tokenizer=VOCAB)


def test_med_config_that_does_not_match_the_checkpoint() -> None:
    med = {**TINY_MED_CONFIG, "hidden_size": 48, "num_attention_heads": 3}
    key = "blip.text_encoder.embeddings.word_embeddings.weight"
    with pytest.raises(ValueError, match=re.escape(f"['{key}']: shape (200, 32)") + ".*(200, 48)"):
        ImageRewardModel.from_state_dict(_tiny_state_dict(), med, tokenizer=VOCAB)
    with pytest.raises(ValueError, match="add_cross_attention"):
        ImageRewardModel.from_state_dict(
            _tiny_state_dict(), {**TINY_MED_CONFIG, "add_cross_attention": False}, tokenizer=VOCAB
        )


# ------------------------------------------------------------------------- full-size keys


def test_every_full_size_key_is_consumed() -> None:
    """The package's real key list converts completely and builds ViT-L/16 + BERT-base on the
    meta device (no memory), with the sizes the files imply."""
    sd = {
        k: torch.arange(s[-1]).expand(s).clone() if dt == "int64" else torch.empty(s, device="meta")
        for k, s, dt in KEYS
    }
    parts = convert_imagereward_state_dict(sd)
    consumed = [checkpoint_key(name, k) for name, part in parts._asdict().items() for k in part]
    assert len(consumed) == len(set(consumed))
    assert sorted(consumed + list(IGNORED_KEYS)) == sorted(sd)
    model = ImageRewardModel.from_state_dict(sd, MED_CONFIG, tokenizer=VOCAB, device="meta")
    v, t = model.vision.config, model.text.config
    vision = (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size)
    assert vision == (1024, 24, 16, 4096)
    assert (v.patch_size, v.image_size, v.layer_norm_eps) == (16, 224, 1e-6)
    text = (t.hidden_size, t.num_hidden_layers, t.encoder_hidden_size, t.vocab_size)
    assert text == (768, 12, 1024, 30524)
    head = [(m.in_features, m.out_features) for m in model.head]
    assert head == [(768, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
    assert not hasattr(model.text.embeddings, "token_type_embeddings")


# ------------------------------------------------------------------------- parity


def _fixture_images() -> list[Image.Image]:
    return [Image.open(FIXTURE / name) for name in EXPECTED["images"]]


def _as_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255


def test_tensor_preprocessing_against_pil() -> None:
    """Pixel level, in [0, 1] units (x std): the 224x224 image is exact; resized images are
    within ~1/255 (no uint8 rounding), and with quantize=True within PIL's fixed-point slack."""
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    for img in _fixture_images():
        pil = preprocess_pil([img])
        for quantize in (False, True):
            diff = ((preprocess_images(_as_tensor(img), quantize=quantize) - pil) * std).abs()
            if img.size == (224, 224):
                assert float(diff.max()) < 1e-6
            elif quantize:  # a few pixels off by one level
                assert float(diff.max()) < 1.01 / 255
                assert float((diff > 0.5 / 255).float().mean()) < 0.01
            else:
                assert float(diff.max()) < 1.5 / 255 and float(diff.mean()) < 0.25 / 255


@pytest.mark.slow
def test_parity_with_image_reward_package() -> None:
    """Full size (ViT-L/16 + BERT-base, 447 M parameters, ~19 s on one core): the package's
    scores of 4 PNGs (224x224, 320x256 down, 200x180 up, 384x512 down) with 3 prompts (one
    truncated at 35 tokens), image i paired with prompt i % 3. Tolerances: PIL-exact input
    2e-5 abs (measured <= 1.4e-6 on all 12 pairs); tensor preprocessing 1e-2 abs (measured
    <= 3.8e-3; the resized images differ from PIL's uint8 output by up to ~1/255)."""
    sd = recipe.make_state_dict(KEYS, EXPECTED["seed"])
    # The fixture's weights up to torch.randn's float32 rounding on this CPU (recipe.py):
    # its SHA-256 holds on AVX2/AVX-512 kernels only, so the moments are checked instead.
    moments = json.loads((FIXTURE / "moments.json").read_text())
    assert recipe.moments_mismatch(sd, moments) == []
    model = ImageRewardModel.from_state_dict(sd, FIXTURE / "med_config.json", tokenizer=VOCAB)
    del sd
    images = _fixture_images()
    n_prompts = len(EXPECTED["prompts"])
    prompts = [EXPECTED["prompts"][i % n_prompts] for i in range(len(images))]
    expected = torch.tensor([EXPECTED["scores"][i][i % n_prompts] for i in range(len(images))])
    # One forward: the PIL path for all four images, the tensor path for the three resized.
    pixels = torch.cat(
        [preprocess_pil(images)] + [preprocess_images(_as_tensor(img)) for img in images[1:]]
    )
    scores = model.score_pixels(pixels, prompts + prompts[1:])
    torch.testing.assert_close(scores[:4], expected, atol=2e-5, rtol=0)
    torch.testing.assert_close(scores[4:], expected[1:], atol=1e-2, rtol=0)


def test_from_package() -> None:
    pytest.importorskip("ImageReward")  # image-reward 1.5 needs transformers < 5
    try:
        model = ImageRewardModel.from_package()
    except (OSError, RuntimeError) as err:  # the checkpoint cannot be downloaded
        pytest.skip(f"ImageReward checkpoint unavailable: {err}")
    assert model(torch.rand(2, 3, 64, 64), ["a cat", "a dog"]).shape == (2,)


def test_search_reward_args_give_the_search_its_own_copy(
    tmp_path: Path, tiny_files: tuple[Path, Path]
) -> None:
    """``search_reward_args: {dtype: bfloat16}``: the search ranks with a bfloat16 copy, the
    rollouts' rewards stay float32; the step runs. A loader that does not take the argument is
    an error naming ``search_reward_args``."""
    from smartgrpo_fast.train.config import ConfigError, load_config
    from smartgrpo_fast.train.trainer import GRPOTrainer

    small = [
        "sample.prompts_per_step=1", "sample.group_size=2", "sample.steps=3",
        "sample.sde_window_size=1", "sample.sde_window_range=[0, 2]", "search.k=2",
        "search.rounds=1", "search.top=1", "train.steps=1", "eval.every=0", "device=cpu",
        "log.progress=false", "log.tensorboard=false", "lora.rank=2", "lora.alpha=4",
    ]  # fmt: skip
    ir = [
        "reward=imagereward", f"reward_args.checkpoint={tiny_files[0]}",
        f"reward_args.med_config={tiny_files[1]}", f"reward_args.tokenizer={VOCAB}",
    ]  # fmt: skip
    cfg = load_config("tiny", [*small, *ir, "search_reward_args.dtype=bfloat16"])
    t = GRPOTrainer(cfg, tmp_path / "run")
    assert t.reward.dtype == torch.float32 and t.search_reward.dtype == torch.bfloat16
    assert t.searcher.reward is t.search_reward and t.search_reward is not t.reward
    t.train()
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert line["step"] == 1 and np.isfinite(line["reward_mean"])
    same = GRPOTrainer(load_config("tiny", [*small, *ir]), tmp_path / "run2")
    assert same.searcher.reward is same.reward
    with pytest.raises(ConfigError, match=r"^search_reward_args: tiny: .*dtype"):
        GRPOTrainer(
            load_config("tiny", [*small, "reward=tiny", "search_reward_args.dtype=bfloat16"]),
            tmp_path / "r3",
        )
    for key in ("reward_args", "search_reward_args"):  # refused when the config loads
        with pytest.raises(ConfigError, match=rf"^{key}: dtype: expected one of bfloat16, "):
            load_config("tiny", [*small, *ir, f"{key}.dtype=int8"])
