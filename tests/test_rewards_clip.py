"""CLIP rewards on a tiny randomly initialised CLIP (no download): loading from a folder and
from a fake Hugging Face cache, batched vs one-at-a-time, the reference formulas, the
aesthetic head's checks, input errors and the truncation warning."""

from __future__ import annotations

import json
import logging
import shutil
import string

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_float_order_close

transformers = pytest.importorskip("transformers")

from smartgrpo_fast.rewards import clip as C  # noqa: E402

MEAN, STD = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)  # not CLIP's: proves they are read from the config
PROMPTS = ["a red square", "a blue circle on a green background", "x", "the cross"]
# Tolerances: batched vs one-at-a-time float32 CPU matmuls differ by reduction order only.
ATOL_BATCH = 1e-5
ATOL_REF = 1e-5


def _tiny_tokenizer(folder):
    """A character-level CLIP BPE: vocab.json + merges.txt as transformers' own tests write."""
    letters = string.ascii_lowercase
    vocab = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters)]
    vocab += ["re", "ed</w>"]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\nr e\ne d</w>\n")
    return transformers.CLIPTokenizer.from_pretrained(folder, model_max_length=77)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A saved CLIPModel (hidden 32, 2 layers, 32 px, patch 8, projection 16) + processor."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    root = tmp_path_factory.mktemp("clip")
    tok = _tiny_tokenizer(root / "tokenizer")
    ip = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
        image_mean=list(MEAN), image_std=list(STD),
    )  # fmt: skip
    common = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    cfg = transformers.CLIPConfig(
        text_config=dict(
            common, vocab_size=len(tok), max_position_embeddings=77,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(common, image_size=32, patch_size=8),
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.CLIPModel(cfg).eval()
    out = root / "model"
    model.save_pretrained(out)
    transformers.CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(out)
    torch.manual_seed(1)
    head = C.AestheticHead(16)
    torch.save(head.state_dict(), root / "head.pth")
    return root


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    d = tiny_dir / "model"
    return {
        "aesthetic": C.load_aesthetic(d, tiny_dir / "head.pth"),
        "pickscore": C.load_pickscore(d, d),
        "clipscore": C.load_clipscore(d),
    }


def _images(n: int, seed: int = 0, size: tuple[int, int] = (32, 32)) -> torch.Tensor:
    return torch.rand((n, 3, *size), generator=torch.Generator().manual_seed(seed))


def _reference_embeds(reward, images, prompts):
    """CLIPModel.get_image_features / get_text_features on hand-made inputs (32 px images:
    no resize, identity crop, so pixels = (x - mean) / std)."""
    m = reward.model
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    img = m.get_image_features(pixel_values=(images - mean) / std).pooler_output
    if prompts is None:
        return F.normalize(img, dim=-1), None
    tok = reward.text.tokenizer(prompts, padding=True, return_tensors="pt")
    txt = m.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
    return F.normalize(img, dim=-1), F.normalize(txt.pooler_output, dim=-1)


@pytest.mark.float_order
@pytest.mark.parametrize("name", ["aesthetic", "pickscore", "clipscore"])
def test_shape_dtype_determinism_and_batch_equals_single(loaded, name) -> None:
    reward = loaded[name]
    images = _images(4)
    out = reward(images, PROMPTS)
    assert out.shape == (4,) and out.dtype == torch.float32 and out.device == images.device
    assert torch.isfinite(out).all()
    assert torch.equal(out, reward(images, PROMPTS))
    single = torch.cat([reward(images[i : i + 1], PROMPTS[i : i + 1]) for i in range(4)])
    assert_float_order_close(out, single, name="one at a time")
    # per pair, not a softmax over the batch: other images do not move image 0's score
    other = torch.cat([images[:1], _images(3, seed=5)])
    assert_float_order_close(reward(other, PROMPTS)[0], out[0], name="image 0 among others")


@torch.no_grad()
def test_reference_formulas(loaded) -> None:
    images = _images(4, seed=2)
    pick, cs, aes = loaded["pickscore"], loaded["clipscore"], loaded["aesthetic"]
    img, txt = _reference_embeds(pick, images, PROMPTS)
    cos = (img * txt).sum(-1)
    torch.testing.assert_close(
        pick(images, PROMPTS), pick.model.logit_scale.exp() * cos, atol=ATOL_REF, rtol=0
    )
    torch.testing.assert_close(cs(images, PROMPTS), 2.5 * cos.clamp_min(0), atol=ATOL_REF, rtol=0)
    img, _ = _reference_embeds(aes, images, None)
    torch.testing.assert_close(
        aes(images, PROMPTS), aes.head(img).squeeze(-1), atol=ATOL_REF, rtol=0
    )


@torch.no_grad()
def test_prompts_matter_and_a_negated_text_projection_flips_the_scores(tiny_dir) -> None:
    """Constructed case: negating text_projection negates every text embedding, so cos -> -cos:
    PickScore changes sign, and exactly one of CLIPScore(pair), CLIPScore'(pair) is > 0."""
    d = tiny_dir / "model"
    pick, cs = C.load_pickscore(d, d), C.load_clipscore(d)
    images = _images(4, seed=3)
    p0, c0 = pick(images, PROMPTS), cs(images, PROMPTS)
    assert not torch.allclose(p0, pick(images, PROMPTS[::-1]))  # the prompt changes the score
    for r in (pick, cs):
        r.model.text_projection.weight.neg_()
    p1, c1 = pick(images, PROMPTS), cs(images, PROMPTS)
    torch.testing.assert_close(p1, -p0, atol=ATOL_REF, rtol=0)
    assert bool(((c0 > 0) ^ (c1 > 0)).all())  # random weights: no cosine is exactly 0
    torch.testing.assert_close(c0 - c1, 2.5 * p0 / pick.model.logit_scale.exp(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["aesthetic", "pickscore", "clipscore"])
def test_prepare_then_score_equals_the_call_and_reads_no_strings(loaded, name) -> None:
    """prepare holds the text half (fixed (N, D) shape whatever the prompts' lengths), score
    the image half on tensors only: what a captured search round replays."""
    reward = loaded[name]
    images = _images(4, seed=5)
    prepared = reward.prepare(PROMPTS)
    want = reward(images, PROMPTS)
    torch.testing.assert_close(reward.score(images, prepared), want, atol=0, rtol=0)
    swapped = type(prepared)(("zzz",) * 4, prepared.tensors)
    torch.testing.assert_close(reward.score(images, swapped), want, atol=0, rtol=0)
    other = reward.prepare(["x", "y", "a much longer prompt than the others", "z"])
    assert other.signature() == prepared.signature()
    if name == "aesthetic":
        assert not prepared.tensors
    else:
        assert prepared.tensors["text"].shape == (4, 16)


def test_distinct_prompts_are_encoded_once(loaded, monkeypatch) -> None:
    reward = loaded["clipscore"]
    seen = []
    orig = reward.text.__call__

    class Spy:
        def __init__(self, enc):
            self.enc, self.truncated_prompts = enc, 0

        def __call__(self, prompts, device):
            seen.append(list(prompts))
            return orig(prompts, device)

    monkeypatch.setattr(reward, "text", Spy(reward.text))
    images = _images(6, seed=4)
    prompts = ["a red square"] * 3 + ["x"] * 3
    out = reward(images, prompts)
    assert seen == [["a red square", "x"]]
    monkeypatch.undo()
    torch.testing.assert_close(out, reward(images, prompts), atol=0, rtol=0)


@pytest.mark.parametrize("hw", [(48, 40), (20, 24), (100, 80)])
def test_preprocessing_matches_the_processor(loaded, tiny_dir, hw) -> None:
    """Resize (short side -> 32), centre crop and normalise vs the transformers processor on the
    uint8 PIL image of a smooth picture: they differ by one uint8 level at most (PIL rounds
    between its two passes), 1 / 255 / min(std) = 0.0196 -> atol 0.025. (On pixel noise PIL's
    intermediate uint8 clamp of bicubic overshoot makes rare larger differences.)"""
    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    t = loaded["clipscore"].transform
    assert t.image_mean == MEAN and t.image_std == STD and t.shortest_edge == 32
    assert t.resized_shape(48, 40) == (38, 32) and t.resized_shape(40, 48) == (32, 38)
    low = torch.rand(1, 3, 6, 5, generator=torch.Generator().manual_seed(0))
    smooth = F.interpolate(low, size=hw, mode="bilinear", align_corners=False)
    u8 = (smooth * 255).round().to(torch.uint8)
    ip = CLIPImageProcessorPil.from_pretrained(tiny_dir / "model")
    ref = ip(images=Image.fromarray(u8[0].permute(1, 2, 0).numpy()), return_tensors="pt")
    ours = t(u8.float() / 255)
    assert ours.shape == ref["pixel_values"].shape == (1, 3, 32, 32)
    torch.testing.assert_close(ours, ref["pixel_values"], atol=0.025, rtol=0)


def test_centre_crop_pads_like_transformers() -> None:
    import numpy as np
    from transformers.image_transforms import center_crop

    t = C.ClipImageTransform(MEAN, STD, shortest_edge=None, crop_size=(7, 4), normalize=False)
    x = torch.rand(1, 3, 4, 6)
    ref = center_crop(x[0].numpy(), (7, 4), data_format="channels_first")
    assert np.array_equal(t(x)[0].numpy(), ref)


@pytest.mark.parametrize(
    "images,prompts,exc,match",
    [
        (torch.full((2, 3, 32, 32), float("nan")), ["a", "b"], ValueError, "NaN"),
        (torch.full((2, 3, 32, 32), 1.5), ["a", "b"], ValueError, r"\[0, 1\]"),
        (torch.full((2, 3, 32, 32), -0.1), ["a", "b"], ValueError, r"\[0, 1\]"),
        (torch.zeros(2, 1, 32, 32), ["a", "b"], ValueError, r"\(N, 3, H, W\)"),
        (torch.zeros(3, 32, 32), ["a", "b"], ValueError, r"\(N, 3, H, W\)"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), ["a", "b"], TypeError, "float"),
        (torch.zeros(2, 3, 32, 32), ["a"], ValueError, "2 prompts"),
        (torch.zeros(2, 3, 32, 32), "ab", TypeError, "list of strings"),
    ],
)
def test_input_errors(loaded, images, prompts, exc, match) -> None:
    for reward in loaded.values():
        with pytest.raises(exc, match=match):
            reward(images, prompts)


def test_long_prompts_are_truncated_with_one_warning(tiny_dir, caplog) -> None:
    d = tiny_dir / "model"
    reward = C.load_clipscore(d)
    words = [*string.ascii_lowercase] * 4  # 104 one-token words: 106 tokens with bos/eos
    long_prompt, head = " ".join(words), " ".join(words[:75])  # 75 words + bos + eos = 77
    images = _images(2, seed=6)
    with caplog.at_level(logging.WARNING, logger=C.__name__):
        out = reward(images, [long_prompt, "x"])
        reward(images, [long_prompt, long_prompt + " a"])
    warnings = [r for r in caplog.records if r.name == C.__name__]
    assert len(warnings) == 1
    assert "1 of 2 distinct prompts are longer than 77 tokens" in warnings[0].getMessage()
    assert reward.truncated_prompts == 3
    torch.testing.assert_close(out[0], reward(images[:1], [head])[0], atol=ATOL_BATCH, rtol=0)


def test_bfloat16_model_returns_float32(tiny_dir, loaded) -> None:
    reward = C.load_clipscore(tiny_dir / "model", dtype=torch.bfloat16)
    assert reward.model.dtype == torch.bfloat16
    images = _images(4, seed=7)
    out = reward(images, PROMPTS)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, loaded["clipscore"](images, PROMPTS), atol=0.1, rtol=0)


# ------------------------------------------------------------------------------------------
# Loading: Hugging Face cache, missing files, the aesthetic head
# ------------------------------------------------------------------------------------------


def _fake_hub(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub))
    return hub


def _cache_repo(hub, repo: str, src=None, files=()):
    folder = hub / ("models--" + repo.replace("/", "--"))
    snap = folder / "snapshots" / ("a" * 40)
    if src is not None:
        shutil.copytree(src, snap)
    snap.mkdir(parents=True, exist_ok=True)
    for name, path in files:
        shutil.copy(path, snap / name)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("a" * 40)
    return snap


def test_loading_from_the_hugging_face_cache(tiny_dir, loaded, tmp_path, monkeypatch) -> None:
    hub = _fake_hub(tmp_path, monkeypatch)
    _cache_repo(hub, "org/tiny-clip", src=tiny_dir / "model")
    with pytest.raises(FileNotFoundError, match=r"pass head=PATH"):
        C.load_aesthetic("org/tiny-clip")
    _cache_repo(hub, C.AESTHETIC_REPO, files=[(C.AESTHETIC_FILE, tiny_dir / "head.pth")])
    images = _images(4, seed=8)
    from_cache = {
        "aesthetic": C.load_aesthetic("org/tiny-clip"),
        "pickscore": C.load_pickscore("org/tiny-clip", "org/tiny-clip"),
        "clipscore": C.load_clipscore("org/tiny-clip"),
    }
    for name, reward in from_cache.items():
        assert torch.equal(reward(images, PROMPTS), loaded[name](images, PROMPTS)), name
    with pytest.raises(FileNotFoundError, match=r"not in the local Hugging Face cache.*model=PATH"):
        C.load_clipscore("org/not-there")
    with pytest.raises(FileNotFoundError, match=r"PickScore_v1.*not in the local Hugging Face"):
        C.load_pickscore()
    with pytest.raises(FileNotFoundError, match=r"processor='org/none'.*processor=PATH"):
        C.load_pickscore("org/tiny-clip", "org/none")


def test_missing_files_are_clear_errors(tiny_dir, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"model='\./nope': no such folder"):
        C.load_clipscore("./nope")
    partial = tmp_path / "partial"
    shutil.copytree(tiny_dir / "model", partial)
    (partial / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing tokenizer\.json or vocab\.json"):
        C.load_clipscore(partial)
    (partial / "processor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing preprocessor_config\.json or proc"):
        C.load_clipscore(partial)
    (partial / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no weights"):
        C.load_clipscore(partial)
    with pytest.raises(FileNotFoundError, match=r"head=.*no such file"):
        C.load_aesthetic(tiny_dir / "model", tmp_path / "nope.pth")


def test_aesthetic_head_formats_and_errors(tiny_dir, loaded, tmp_path) -> None:
    from safetensors.torch import save_file

    state = torch.load(tiny_dir / "head.pth", weights_only=True)
    assert sorted(state) == sorted(
        f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")
    )
    save_file(state, tmp_path / "head.safetensors")
    st = C.load_aesthetic(tiny_dir / "model", tmp_path / "head.safetensors")
    images = _images(3, seed=9)
    assert torch.equal(st(images, PROMPTS[:3]), loaded["aesthetic"](images, PROMPTS[:3]))

    def bad(name, s, match):
        torch.save(s, tmp_path / name)
        with pytest.raises(ValueError, match=match):
            C.load_aesthetic(tiny_dir / "model", tmp_path / name)

    # the real head (768 inputs) on a CLIP whose projection dim is 16
    l14 = r"layers\.0\.weight has shape \(1024, 768\), expected \(1024, 16\).*projection dim \(16\)"
    bad("l14.pth", C.AestheticHead(768).state_dict(), l14)
    wrong = dict(state, **{"layers.7.weight": torch.zeros(2, 16)})
    bad("shape.pth", wrong, r"layers\.7\.weight has shape \(2, 16\), expected \(1, 16\)")
    missing = {k: v for k, v in state.items() if k != "layers.4.bias"}
    bad("missing.pth", missing, r"not a LAION aesthetic head.*missing \['layers\.4\.bias'\]")
    bad("extra.pth", dict(state, extra=torch.zeros(1)), r"unexpected \['extra'\]")
