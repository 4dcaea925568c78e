"""The preview decoder (issue 21): an AutoencoderTiny (TAESD3 layout) that decodes the search's
K*N one-step estimates while the VAE decodes every final image. On the tiny random SD3
pipeline and tiny random AutoencoderTiny folders saved with save_pretrained, offline, on CPU."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from helpers import assert_close

from smartgrpo_fast import rewards
from smartgrpo_fast.cli import main
from smartgrpo_fast.models.base import decoder_unscaling, preview_unscaling
from smartgrpo_fast.models.sd3 import SD3FlowModel, load_preview_decoder
from smartgrpo_fast.models.sd3_configs import (
    TAESD3,
    TINY_TAESD3,
    build_tiny_preview_decoder,
    random_taesd3,
    save_tiny_preview_decoder,
    save_tiny_sd3_pipeline,
)
from smartgrpo_fast.ops import x0_estimate
from smartgrpo_fast.search import NoiseSearch, RolloutConfig, SearchConfig, search_reference
from smartgrpo_fast.search.rollout import model_calls

PROMPTS = ["a red circle on a blue background", "a green cross on a white background"]


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory) -> Path:
    return save_tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny_sd3"), seed=0)


@pytest.fixture(scope="module")
def taesd_dir(tmp_path_factory) -> Path:
    return save_tiny_preview_decoder(tmp_path_factory.mktemp("tiny_taesd3"), seed=1)


@pytest.fixture(scope="module")
def model(sd3_dir, taesd_dir) -> SD3FlowModel:
    return SD3FlowModel.from_pretrained(sd3_dir, dtype=torch.float32, preview_decoder=taesd_dir)


@pytest.fixture(autouse=True)
def offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _copy_with_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    file = dst / "config.json"
    cfg = json.loads(file.read_text())
    cfg.update(changes)
    file.write_text(json.dumps(cfg))
    return dst


# ------------------------------------------------------------------------------ loading


def test_loads_the_taesd3_layout(model, taesd_dir) -> None:
    dec = model.preview_decoder
    assert type(dec).__name__ == "AutoencoderTiny" and dec.config.latent_channels == 16
    assert preview_unscaling(model) == (1.0, 0.0)  # TAESD3 reads the diffusion latent
    assert (model.scaling_factor, model.shift_factor) == (1.5305, 0.0609)  # the VAE's
    ref = load_preview_decoder(taesd_dir)
    for a, b in zip(dec.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)


def test_without_a_preview_decoder_the_vae_reads_the_estimates(sd3_dir) -> None:
    m = SD3FlowModel.from_pretrained(sd3_dir, dtype=torch.float32)
    assert m.preview_decoder is None and preview_unscaling(m) == (1.5305, 0.0609)
    x0 = torch.randn(2, 16, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(m.decode_preview(x0), m.decode(x0))


def test_missing_folder_config_and_weights_name_the_file(sd3_dir, taesd_dir, tmp_path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"{missing}: no such folder"):
        SD3FlowModel.from_pretrained(sd3_dir, dtype=torch.float32, preview_decoder=missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"{empty / 'config.json'}: not found"):
        SD3FlowModel.from_pretrained(sd3_dir, dtype=torch.float32, preview_decoder=empty)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(taesd_dir / "config.json", no_weights / "config.json")
    with pytest.raises(FileNotFoundError, match=f"{no_weights}: no weights"):
        load_preview_decoder(no_weights)


def test_wrong_latent_channels_names_the_file_and_field(sd3_dir, tmp_path) -> None:
    from diffusers import AutoencoderTiny

    four = tmp_path / "taesd_sd1"
    AutoencoderTiny(**{**TINY_TAESD3, "latent_channels": 4}).save_pretrained(four)
    with pytest.raises(ValueError, match=r"config\.json: latent_channels is 4; the model's "
                       r"latents have 16 channels"):  # fmt: skip
        SD3FlowModel.from_pretrained(sd3_dir, dtype=torch.float32, preview_decoder=four)


def test_another_class_names_the_field(sd3_dir, tmp_path) -> None:
    vae = sd3_dir / "vae"  # an AutoencoderKL folder
    with pytest.raises(ValueError, match=r"_class_name is 'AutoencoderKL'; expected "
                       r"'AutoencoderTiny'"):  # fmt: skip
        SD3FlowModel.from_pretrained(sd3_dir, dtype=torch.float32, preview_decoder=vae)


def test_set_preview_decoder_checks_channels(model) -> None:
    from diffusers import AutoencoderTiny

    m = SD3FlowModel(model.pipe, model.config)
    with pytest.raises(ValueError, match="latent_channels is 4"):
        m.set_preview_decoder(AutoencoderTiny(**{**TINY_TAESD3, "latent_channels": 4}))


def test_full_size_taesd3_configuration() -> None:
    """The full-size random TAESD3: 16 channels, 8x up-sampling (64 -> 512 px)."""
    dec = random_taesd3()
    assert dec.config.latent_channels == 16 and dict(dec.config)["scaling_factor"] == 1.0
    assert tuple(dec.config.decoder_block_out_channels) == TAESD3["decoder_block_out_channels"]
    with torch.no_grad():
        assert dec.decode(torch.zeros(1, 16, 8, 8)).sample.shape == (1, 3, 64, 64)


# ------------------------------------------------------------------------- the one rule


@torch.no_grad()
@pytest.mark.parametrize("which", ["vae", "taesd", "taesd-scaled"])
def test_unscaling_matches_diffusers_decode_path(model, which) -> None:
    """The image of a diffusion-space latent through diffusers' own SD3 pipeline (its decode
    path: ``latents / vae.config.scaling_factor + shift_factor``, ``vae.decode``,
    ``postprocess``) with that decoder as ``pipe.vae`` equals ours: x0_estimate with the
    preview decoder's (scaling, shift), then decode_preview. ``taesd-scaled``: a decoder whose
    config has scaling 2 and shift 0.25, so a rule that ignored the decoder's config fails."""
    from diffusers import StableDiffusion3Pipeline

    decoder = {"vae": None, "taesd": model.preview_decoder}.get(which)
    if which == "taesd-scaled":
        decoder = build_tiny_preview_decoder(seed=3)
        decoder.register_to_config(scaling_factor=2.0, shift_factor=0.25)
    ours = SD3FlowModel(model.pipe, model.config, preview_decoder=decoder)
    full = decoder if decoder is not None else model.vae
    pipe = StableDiffusion3Pipeline(**{**model.pipe.components, "vae": full})
    pipe.set_progress_bar_config(disable=True)
    cond = model.encode_prompts(PROMPTS[:1])
    start = torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(4))
    kw = dict(prompt_embeds=cond.prompt_embeds, pooled_prompt_embeds=cond.pooled,
              guidance_scale=1.0, num_inference_steps=1, height=64, width=64)  # fmt: skip
    latent = pipe(latents=start.clone(), output_type="latent", **kw).images
    image = pipe(latents=start.clone(), output_type="pt", **kw).images
    scaling, shift = preview_unscaling(ours)
    expected = decoder_unscaling(full.config)
    assert (scaling, shift) == expected
    if which == "taesd-scaled":
        assert expected == (2.0, 0.25)
    x0 = x0_estimate(latent, torch.zeros_like(latent), 0.0, scaling=scaling, shift=shift)
    assert_close(ours.decode_preview(x0), image, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ the search


class _Counter:
    """Counts the rows each decoder (an instance or a class) decodes: wraps its ``decode``."""

    def __init__(self, monkeypatch, **decoders) -> None:
        self.rows = dict.fromkeys(decoders, 0)
        for name, dec in decoders.items():
            monkeypatch.setattr(dec, "decode", self._wrap(name, dec.decode, isinstance(dec, type)))

    def _wrap(self, name, fn, unbound):
        def decode(*args, **kwargs):
            self.rows[name] += args[1 if unbound else 0].shape[0]
            return fn(*args, **kwargs)

        return decode


@torch.no_grad()
def test_search_decodes_its_estimates_with_the_preview_decoder(model, monkeypatch) -> None:
    """K*N preview decodes and no VAE decode per rollout; the same result as the plain
    reference search (the oracle), which reads the estimates through the same rule."""
    reward = rewards.load("tiny-color")
    cfg = SearchConfig(k=4, rounds=2, top=2, graph=False)
    cond = model.encode_prompts(PROMPTS)
    mean = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(5))
    count = _Counter(monkeypatch, vae=model.vae, preview=model.preview_decoder)
    res = NoiseSearch(model, reward, cfg).run(mean, 0.3, 0.8, cond, seed=7)
    assert count.rows == {"vae": 0, "preview": 2 * 4 * 2}
    ref = search_reference(model, reward, mean, 0.3, 0.8, cond, cfg, seed=7)
    assert_close(res.eps, ref.eps, atol=1e-5, rtol=1e-5)
    assert_close(res.rounds.best, ref.rounds.best, atol=1e-4, rtol=1e-4)


def test_model_calls_count_preview_decodes() -> None:
    search, rollout = SearchConfig(k=16, rounds=3), RolloutConfig(steps=10, step=2)
    plain = model_calls(search, rollout)
    assert plain["searched"]["decodes"] == 49 and plain["searched"]["preview_decodes"] == 0
    fast = model_calls(search, rollout, preview=True)
    assert fast["searched"]["decodes"] == 1 and fast["searched"]["preview_decodes"] == 48
    assert fast["bestof"] == fast["searched"] and fast["random"] == plain["random"]
    drop = {"decodes", "preview_decodes"}
    same = {k: {q: v for q, v in c.items() if q not in drop} for k, c in fast.items()}
    assert same == {k: {q: v for q, v in c.items() if q not in drop} for k, c in plain.items()}


def test_cli_search_with_a_preview_decoder(sd3_dir, taesd_dir, tmp_path, monkeypatch) -> None:
    """The issue's done-when command: preview_decodes 8 and decodes 1 per searched rollout,
    and they are the decodes made (counted on the decoders' classes)."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    count = _Counter(monkeypatch, vae=AutoencoderKL, preview=AutoencoderTiny)
    out = tmp_path / "o"
    argv = ["search", "--model", str(sd3_dir), "--preview-decoder", str(taesd_dir),
            "--num-prompts", "2", "--k", "4", "--rounds", "2", "--top", "2",
            "--reward", "tiny-color", "--steps", "3", "--step", "1", "--device", "cpu",
            "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    res = json.loads((out / "result.json").read_text())
    per = res["model_calls"]["per_rollout"]
    for key in ("searched", "bestof"):
        assert per[key]["preview_decodes"] == 8 and per[key]["decodes"] == 1
    assert per["random"]["preview_decodes"] == 0 and per["random"]["decodes"] == 1
    assert res["model_options"]["preview_decoder"] == str(taesd_dir)
    n = len(res["prompts"])
    assert n == 2
    made_preview = sum(res["model_calls"]["total"][k]["preview_decodes"] for k in per)
    made_full = sum(res["model_calls"]["total"][k]["decodes"] for k in per)
    assert count.rows == {"vae": made_full, "preview": made_preview}


def test_cli_preview_decoder_errors(sd3_dir, tmp_path, capsys) -> None:
    base = ["search", "--k", "2", "--rounds", "1", "--top", "1", "--device", "cpu",
            "--no-progress", "--out", str(tmp_path / "o")]  # fmt: skip
    for argv, match in (
        (["--num-prompts", "1", "--preview-decoder", str(tmp_path)],
         "argument --preview-decoder: only for SD3 models"),
        (["--model", str(sd3_dir), "--num-prompts", "1", "--preview-decoder",
          str(tmp_path / "none")], f"argument --preview-decoder: {tmp_path / 'none'}: no such"),
    ):  # fmt: skip
        with pytest.raises(SystemExit) as exc:
            main(base + argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and match in err.strip().splitlines()[-1], err


# ------------------------------------------------------------------------------- float8


def test_float8_needs_a_cuda_gpu(model) -> None:
    from smartgrpo_fast.models.fp8 import check_float8

    with pytest.raises(RuntimeError, match=r"float8: needs a CUDA GPU of compute capability "
                       r">= 8\.9 \(Ada, Hopper or newer\); the model is on cpu"):  # fmt: skip
        check_float8("cpu")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        model.for_search("float8")
    assert model.for_search("model") is model
    with pytest.raises(ValueError, match="search_dtype: expected one of model, float8"):
        model.for_search("int8")


def test_float8_below_capability_8_9_and_without_torchao(monkeypatch) -> None:
    import sys

    from smartgrpo_fast.models import fp8

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(RuntimeError, match=r"A100 has compute capability 8\.0; float8 matmuls "
                       r"need >= 8\.9"):  # fmt: skip
        fp8.check_float8("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setitem(sys.modules, "torchao", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(RuntimeError, match=r"torchao cannot be imported .*pip install "
                       r"'smartgrpo-fast\[fp8\]'"):  # fmt: skip
        fp8.check_float8("cuda")


def test_cli_search_dtype_float8_off_cuda_is_an_argument_error(sd3_dir, tmp_path, capsys):
    argv = ["search", "--model", str(sd3_dir), "--num-prompts", "1", "--search-dtype",
            "float8", "--device", "cpu", "--out", str(tmp_path)]  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "argument --search-dtype: search dtype float8: needs a CUDA GPU" in last
    assert not (tmp_path / "result.json").exists()


@torch.no_grad()
def test_search_model_scores_and_the_model_steps(model, monkeypatch) -> None:
    """compare_noise(search_model=): the searches' forwards run on the search model, every
    rollout step on the model (here a second model sharing everything but its forward)."""
    from smartgrpo_fast.search import compare_noise

    scorer = model.with_transformer(model.transformer)
    assert scorer.preview_decoder is model.preview_decoder and scorer.vae is model.vae
    rows = {"model": 0, "scorer": 0}
    for name, m in (("model", model), ("scorer", scorer)):
        fwd = m._forward

        def counted(z, *a, _fwd=fwd, _name=name):
            rows[_name] += z.shape[0]
            return _fwd(z, *a)

        monkeypatch.setattr(m, "_forward", counted)
    search = SearchConfig(k=2, rounds=2, top=1, graph=False)
    rollout = RolloutConfig(steps=3, step=1, batch=2)
    comp = compare_noise(model, rewards.load("tiny-color"), PROMPTS, search, rollout,
                         search_model=scorer)  # fmt: skip
    assert rows["scorer"] == 2 * 2 * 2 * 2  # 2 searches x B * K * N
    per = comp.calls["random"]["transformer_rows"]  # the prefix + the rest, per rollout
    assert rows["model"] == 2 * (per + 2 * (rollout.steps - rollout.step - 1))
