"""``model.preview_decoder``: the trainer's search decodes its candidates with a cheap decoder
(a local AutoencoderTiny folder, or ``random`` at the model's size) while every rollout's final
image still goes through the VAE; its mistakes are one line naming the key, before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import SD35_TINY_STEP

from smartgrpo_fast.cli import main
from smartgrpo_fast.models.sd3_configs import save_tiny_preview_decoder, save_tiny_sd3_pipeline
from smartgrpo_fast.train.config import ConfigError, load_config
from smartgrpo_fast.train.trainer import GRPOTrainer

_STEP = [*SD35_TINY_STEP, "train.memory_limit_gib=64"]
ROWS, WINDOW, K, ROUNDS = 2, 2, 2, 1


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory) -> Path:
    return save_tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny_sd3"), seed=0)


@pytest.fixture(scope="module")
def tiny_preview(tmp_path_factory) -> Path:
    return save_tiny_preview_decoder(tmp_path_factory.mktemp("tiny_taesd3"), seed=0)


def _count_images(module: torch.nn.Module, counts: dict[str, int], key: str) -> None:
    """Count the images ``module.decode`` decodes (an instance attribute over the method)."""
    decode = module.decode

    def spy(z: torch.Tensor, *args, **kwargs):
        counts[key] += z.shape[0]
        return decode(z, *args, **kwargs)

    module.decode = spy


def _step_counting_decodes(cfg, out: Path) -> tuple[GRPOTrainer, dict[str, int]]:
    t = GRPOTrainer(cfg, out)
    counts = {"preview": 0, "vae": 0}
    if t.model.preview_decoder is not None:
        _count_images(t.model.preview_decoder, counts, "preview")
    _count_images(t.model.vae, counts, "vae")
    t.train()
    return t, counts


@pytest.mark.parametrize("name", ["random:sd3-tiny", "pipeline"])
def test_search_decodes_with_the_preview_decoder_and_rollouts_with_the_vae(
    tmp_path, tiny_pipeline, tiny_preview, name
) -> None:
    """``random`` (TAESD3's layout at the tiny size: the VAE up-samples 2x) and a folder saved
    by ``save_tiny_preview_decoder``: the search's K x N candidates of every SDE step go
    through the preview decoder, in the transformer's dtype; the final images through the VAE,
    one per rollout; the memory estimate counts the cheaper decode."""
    model = str(tiny_pipeline) if name == "pipeline" else name
    base = load_config("sd35-medium", [*_STEP, f"model.name={model}"])
    plain, plain_counts = _step_counting_decodes(base, tmp_path / "plain")
    assert plain.model.preview_decoder is None
    assert plain_counts == {"preview": 0, "vae": ROWS + ROWS * WINDOW * K * ROUNDS}
    for spec in ("random", str(tiny_preview)):
        cfg = load_config("sd35-medium", [*_STEP, f"model.name={model}",
                                          f"model.preview_decoder={spec}"])  # fmt: skip
        t, counts = _step_counting_decodes(cfg, tmp_path / f"run-{len(spec)}")
        dec = t.model.preview_decoder
        assert type(dec).__name__ == "AutoencoderTiny"
        assert tuple(dec.config.decoder_block_out_channels) == (8, 8)  # the tiny layout, 2x
        assert dec.dtype == t.model.dtype == torch.float32
        assert counts == {"preview": ROWS * WINDOW * K * ROUNDS, "vae": ROWS}, spec
        lines = (t.out / "metrics.jsonl").read_text().splitlines()
        (line,) = [json.loads(x) for x in lines]
        assert line["logp_diff_max"] < 1e-5
        est, ref = t.memory_estimate.parts, plain.memory_estimate.parts
        assert est["search"] < ref["search"] and est["rollout"] == ref["rollout"]
        assert t.cfg.model.preview_decoder == spec


def test_the_preview_decoder_runs_in_the_transformers_dtype(tiny_preview) -> None:
    from smartgrpo_fast.train.trainer import build_model

    cfg = load_config("sd35-medium", [*_STEP, "model.dtype=bfloat16",
                                      f"model.preview_decoder={tiny_preview}"])  # fmt: skip
    model = build_model(cfg, torch.device("cpu"))
    assert model.dtype == model.preview_decoder.dtype == torch.bfloat16
    assert model.vae.dtype == torch.float32


def test_preview_decoder_on_the_embedded_model_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"^model\.preview_decoder: the embedded model tiny "):
        load_config("tiny", ["model.preview_decoder=random"])
    with pytest.raises(ConfigError, match=r"^model\.preview_decoder: expected an "):
        load_config("sd35-medium", ["model.preview_decoder=''"])


def _bad_channels(tmp_path: Path) -> Path:
    folder = save_tiny_preview_decoder(tmp_path / "four", seed=0)
    meta = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**meta, "latent_channels": 4}))
    return folder


@pytest.mark.parametrize(
    "case, words",
    [
        ("missing", ["no such folder", "AutoencoderTiny"]),
        ("channels", ["latent_channels is 4", "16 channels"]),
    ],
)
def test_a_bad_preview_folder_is_one_line_before_any_work(tmp_path, capsys, case, words) -> None:
    folder = tmp_path / "nope" if case == "missing" else _bad_channels(tmp_path)
    cfg = load_config("sd35-medium", [*_STEP, f"model.preview_decoder={folder}"])
    with pytest.raises(ConfigError, match=r"^model\.preview_decoder: ") as err:
        GRPOTrainer(cfg, tmp_path / "run")
    assert all(w in str(err.value) for w in words), str(err.value)
    assert not (tmp_path / "run").exists()
    out = tmp_path / "cli"
    code = main(["train", "--config", "sd35-medium", "--out", str(out), *_STEP,
                 f"model.preview_decoder={folder}"])  # fmt: skip
    assert code == 2 and not out.exists()
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("smartgrpo-fast train: error: model.preview_decoder: "), line
