"""SD3FlowModel on a tiny random StableDiffusion3Pipeline saved with save_pretrained and
loaded back through the same from_pretrained path a real checkpoint takes (offline)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from helpers import assert_close

from smartgrpo_fast import models
from smartgrpo_fast.models import Cond, FlowModel
from smartgrpo_fast.models.sd3 import SD3Config, SD3FlowModel
from smartgrpo_fast.models.sd3_configs import (
    SD3_VAE,
    SD35_MEDIUM_TRANSFORMER,
    save_tiny_sd3_pipeline,
)
from smartgrpo_fast.ops import sample_perturb, x0_estimate

PROMPTS = ["a red circle on a blue background", "a photo of a cat", "a green square"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny_sd3"), seed=0)


@pytest.fixture(scope="module")
def model(tiny_dir) -> SD3FlowModel:
    return SD3FlowModel.from_pretrained(tiny_dir, dtype=torch.float32)


@pytest.fixture(autouse=True)
def offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_load_through_registry(tiny_dir) -> None:
    m = models.load(str(tiny_dir), dtype=torch.float32)
    assert isinstance(m, SD3FlowModel) and isinstance(m, FlowModel)
    assert m.latent_shape == (16, 32, 32) and m.image_size == 64
    assert (m.scaling_factor, m.shift_factor) == (1.5305, 0.0609)
    assert m.time_shift == m.pipe.scheduler.config.shift == 3.0  # the schedule sde uses
    assert m.vae.dtype == torch.float32


def test_bf16_keeps_the_vae_in_float32(tiny_dir) -> None:
    m = SD3FlowModel.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    assert m.transformer.dtype == torch.bfloat16 and m.vae.dtype == torch.float32


def test_encode_prompts_shapes_and_determinism(model) -> None:
    cond = model.encode_prompts(PROMPTS)
    assert cond.prompt_embeds.shape == (3, 77 + 128, 32)
    assert cond.pooled.shape == (3, 64)
    assert cond.prompts == tuple(PROMPTS) and not cond.has_negative
    again = model.encode_prompts(PROMPTS)
    assert torch.equal(cond.prompt_embeds, again.prompt_embeds)
    assert not torch.equal(cond.pooled[0], cond.pooled[1])


def test_end_to_end_search_round_on_cpu(model) -> None:
    """encode -> K candidates -> velocity -> x0_estimate -> decode, with the real classes."""
    b, k = 2, 4
    cond = model.encode_prompts(PROMPTS[:b])
    mean = torch.randn(b, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    z = sample_perturb(mean, 0.0, 1.0, 0.3, k=k, seed=1).flatten(0, 1)  # (B*K, C, H, W)
    with torch.no_grad():
        v = model.velocity(z, 0.7, cond, k=k)
    assert v.shape == z.shape and v.dtype == z.dtype and torch.isfinite(v).all()
    x0 = x0_estimate(z, v, 0.7, scaling=model.scaling_factor, shift=model.shift_factor)
    images = model.decode(x0)
    assert images.shape == (b * k, 3, 64, 64) and images.dtype == torch.float32
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert model.decode(x0, size=32).shape == (b * k, 3, 32, 32)


@torch.no_grad()
def test_k_candidates_share_their_prompt(model) -> None:
    """velocity(z, t, cond, k) equals the forward with every prompt repeated k times."""
    b, k = 3, 2
    cond = model.encode_prompts(PROMPTS)
    z = torch.randn(b * k, *model.latent_shape, generator=torch.Generator().manual_seed(1))
    batched = model.velocity(z, 0.5, cond, k=k)
    repeated = cond.select([0, 0, 1, 1, 2, 2])
    assert_close(batched, model.velocity(z, 0.5, repeated, k=1), atol=1e-5, rtol=1e-5)
    for i in range(b):  # and each prompt alone
        alone = model.velocity(z[i * k : (i + 1) * k], 0.5, cond.select([i]), k=k)
        assert_close(batched[i * k : (i + 1) * k], alone, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_flow_time_is_converted_to_1000_t(model) -> None:
    cond = model.encode_prompts(PROMPTS[:1])
    z = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(2))
    direct = model.transformer(
        hidden_states=z,
        encoder_hidden_states=cond.prompt_embeds.expand(2, -1, -1),
        pooled_projections=cond.pooled.expand(2, -1),
        timestep=torch.tensor([250.0, 900.0]),
        return_dict=False,
    )[0]
    v = model.velocity(z, torch.tensor([0.25, 0.9]), cond, k=2)
    assert_close(v, direct, atol=1e-6, rtol=1e-6)
    v_float = model.velocity(z[:1], 0.25, cond, k=1)
    assert_close(v_float, direct[:1], atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_classifier_free_guidance(tiny_dir) -> None:
    g = 4.5
    guided = SD3FlowModel.from_pretrained(
        tiny_dir, dtype=torch.float32, config=SD3Config(guidance_scale=g)
    )
    cond = guided.encode_prompts(PROMPTS[:2])
    assert cond.has_negative
    z = torch.randn(4, *guided.latent_shape, generator=torch.Generator().manual_seed(3))
    v = guided.velocity(z, 0.6, cond, k=2)
    plain = SD3FlowModel(guided.pipe, SD3Config())
    v_c = plain.velocity(z, 0.6, cond, k=2)
    uncond = Cond(cond.negative_prompt_embeds, cond.negative_pooled)
    v_u = plain.velocity(z, 0.6, uncond, k=2)
    assert_close(v, v_u + g * (v_c - v_u), atol=1e-5, rtol=1e-5)


def test_embedding_cache_and_released_encoders(tiny_dir, tmp_path) -> None:
    cache = tmp_path / "emb"
    cfg = SD3Config(embedding_cache=str(cache), release_text_encoders=True)
    m = SD3FlowModel.from_pretrained(tiny_dir, dtype=torch.float32, config=cfg)
    first = m.encode_prompts(PROMPTS[:2])
    assert len(list(cache.glob("*.safetensors"))) == 2
    assert m.pipe.text_encoder is None and m.pipe.text_encoder_3 is None
    again = m.encode_prompts(PROMPTS[1::-1])  # from the cache, reordered
    assert torch.equal(again.prompt_embeds, first.prompt_embeds.flip(0))
    with pytest.raises(RuntimeError, match=r"released.*not in the embedding cache"):
        m.encode_prompts(["a prompt never seen"])


def test_repo_id_from_the_hugging_face_cache(tiny_dir, tmp_path, monkeypatch) -> None:
    snapshot = tmp_path / "hub" / "models--org--tiny-sd3" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_dir, snapshot)
    (tmp_path / "hub" / "models--org--tiny-sd3" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny-sd3" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    m = models.load("org/tiny-sd3", dtype=torch.float32)
    assert m.latent_shape == (16, 32, 32)
    with pytest.raises(FileNotFoundError, match="not found in the local Hugging Face cache"):
        models.load("org/not-there")


def test_missing_folder_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no such folder"):
        models.load(str(tmp_path / "nope"))


def test_missing_model_index(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"model_index\.json: not found"):
        models.load(str(tmp_path))


def test_missing_weights_names_the_file(tiny_dir, tmp_path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    for f in (broken / "transformer").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match=r"transformer: no weights"):
        models.load(str(broken))


def test_unknown_layout(tiny_dir, tmp_path) -> None:
    other = tmp_path / "other"
    shutil.copytree(tiny_dir, other)
    meta = json.loads((other / "model_index.json").read_text())
    meta["_class_name"] = "FluxPipeline"
    (other / "model_index.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="_class_name is 'FluxPipeline'"):
        models.load(str(other))


def test_velocity_argument_errors(model) -> None:
    cond = model.encode_prompts(PROMPTS[:2])
    z = torch.zeros(4, *model.latent_shape)
    with pytest.raises(ValueError, match=r"^z: expected B\*k = 2\*3 = 6 rows, got 4"):
        model.velocity(z, 0.5, cond, k=3)
    with pytest.raises(ValueError, match=r"^z: expected \(B\*k, 16, 32, 32\)"):
        model.velocity(torch.zeros(4, 16, 8, 8), 0.5, cond, k=2)
    with pytest.raises(ValueError, match=r"^t: expected a flow time in \[0, 1\], got 1.5"):
        model.velocity(z, 1.5, cond, k=2)
    with pytest.raises(TypeError, match=r"^prompts:"):
        model.encode_prompts("a single string")


@torch.no_grad()
def test_resolution_sets_the_latent_size(model) -> None:
    half = SD3FlowModel(model.pipe, SD3Config(resolution=32))
    assert half.latent_shape == (16, 16, 16)
    cond = half.encode_prompts(PROMPTS[:1])
    v = half.velocity(torch.randn(2, 16, 16, 16), 0.5, cond, k=2)
    assert v.shape == (2, 16, 16, 16)
    with pytest.raises(ValueError, match=r"^resolution: expected a multiple of 4"):
        SD3FlowModel(model.pipe, SD3Config(resolution=34))


def test_xformers_that_cannot_run_is_a_clear_error(tiny_dir) -> None:
    with pytest.raises(RuntimeError, match="attention='xformers': xformers cannot run here"):
        SD3FlowModel.from_pretrained(tiny_dir, dtype=torch.float32, attention="xformers")


def test_full_size_configuration_matches_sd35_medium() -> None:
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER)
        vae = AutoencoderKL(**SD3_VAE)
    n_params = sum(p.numel() for p in transformer.parameters())
    assert abs(n_params - 2.243e9) < 0.01e9, n_params  # + 0.23 B positional table (a buffer)
    assert transformer.inner_dim == 1536 and len(transformer.transformer_blocks) == 24
    assert vae.config.latent_channels == 16 and vae.config.scaling_factor == 1.5305


@pytest.mark.cuda
@torch.no_grad()
def test_graphed_velocity_matches_eager_in_bf16(tiny_dir) -> None:
    from smartgrpo_fast.graphs import GraphConfig

    eager = SD3FlowModel.from_pretrained(tiny_dir, dtype=torch.bfloat16, device="cuda")
    graphed = SD3FlowModel(eager.pipe, SD3Config(graph=GraphConfig(backend="graph")))
    cond = eager.encode_prompts(PROMPTS[:2])
    z = torch.randn(2 * 8, *eager.latent_shape, device="cuda")
    v_eager = eager.velocity(z, 0.7, cond, k=8)
    v_graph = graphed.velocity(z, 0.7, cond, k=8)
    v_graph2 = graphed.velocity(z[:6], 0.7, cond.select([0]), k=6)  # another bucket
    assert graphed._forward.stats.captures == 2
    assert_close(v_graph, v_eager, atol=2e-2, rtol=1.6e-2, name="graph vs eager")
    assert_close(v_graph2, v_eager[:6], atol=2e-2, rtol=1.6e-2, name="bucket 8, 6 rows")


def test_loading_prints_no_torchvision_notice_and_a_bad_path_fails_first(tiny_dir) -> None:
    """transformers announces a PIL fallback for the CLIP/SigLIP image processors the SD3
    pipeline imports but never uses: not printed (a fresh process: it warns once). A missing
    folder fails before diffusers is imported, so nothing precedes its error."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from smartgrpo_fast.models.sd3 import SD3FlowModel\n"
        "try:\n"
        "    SD3FlowModel.from_pretrained('/nonexistent/sd3')\n"
        "except FileNotFoundError as e:\n"
        "    print(e, file=sys.stderr)\n"
        "assert 'diffusers.pipelines' not in ' '.join(sys.modules)\n"
        f"SD3FlowModel.from_pretrained({str(tiny_dir)!r}, dtype=torch.float32)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.startswith("/nonexistent/sd3: no such folder"), proc.stderr[:500]
    assert "torchvision" not in proc.stderr, proc.stderr[:2000]
