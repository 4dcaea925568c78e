"""``bench search`` variants (issue 21): fused / graph with the options preview, compile and
fp8 on the SD3 models, each timed and split into stages. On CPU: the tiny random SD3 pipeline,
and the sd35-medium path with its builders patched to small modules of the same layout (8x
VAE and TAESD3 factors, 512 px); torch.compile replaced by a recorder. No timing asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from smartgrpo_fast.bench import search as bench_search
from smartgrpo_fast.cli import main
from smartgrpo_fast.models import sd3_configs

SMALL = dict(batch=1, k=2, rounds=1, top=1, repeats=1, warmup=0, device="cpu")


class _Rows:
    """Counts the rows decoded by the VAE and the preview decoder classes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from diffusers import AutoencoderKL, AutoencoderTiny

        self.rows = {"vae": 0, "preview": 0}
        for name, cls in (("vae", AutoencoderKL), ("preview", AutoencoderTiny)):
            monkeypatch.setattr(cls, "decode", self._wrap(name, cls.decode))

    def _wrap(self, name, fn):
        def decode(module, x, *args, **kwargs):
            self.rows[name] += x.shape[0]
            return fn(module, x, *args, **kwargs)

        return decode


@pytest.mark.parametrize(
    "name, want",
    [
        ("graph+compile+preview", "graph+preview+compile"),
        ("fused+fp8+preview", "fused+preview+fp8"),
        ("reference", "reference"),
    ],
)
def test_canonical_provider(name: str, want: str) -> None:
    assert bench_search.canonical_provider(name) == want


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(providers=("naive",)), "expected reference, fused, graph"),
        (dict(providers=("fused+tensorrt",)), "unknown option 'tensorrt'"),
        (dict(providers=("fused+preview+preview",)), "an option given twice"),
        (dict(providers=("reference+preview",)), "the naive reference takes no options"),
        (dict(providers=("graph+preview",), model="sd3-tiny"), "needs a CUDA device"),
        (dict(providers=("fused+preview",), model="tiny"), "options need an SD3 model"),
        (dict(providers=("fused+fp8",), model="sd3-tiny"), "fp8: search dtype float8: needs a"),
        (dict(backend="graph"), "backend: expected one of compile-reduce-overhead"),
    ],
)
def test_config_errors(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        bench_search.SearchBenchConfig(**kw)


@torch.no_grad()
def test_sd3_tiny_variants_time_and_split_each(compiled, monkeypatch) -> None:
    """Every provider gets its whole-search rows and a six-stage split; the preview variants
    decode the candidates with the preview decoder (the reference and fused with the VAE);
    the compile variant's forwards ran through torch.compile on the chosen backend."""
    providers = ("reference", "fused", "fused+preview", "fused+preview+compile")
    cfg = bench_search.SearchBenchConfig(model="sd3-tiny", providers=providers,
                                         backend="compile-max-autotune", **SMALL)  # fmt: skip
    count = _Rows(monkeypatch)
    rows = bench_search.run(cfg)
    for p in providers:
        got = {r["metric"] for r in rows if r["provider"] == p and r["op"] == "search"}
        assert {"time", "throughput"} <= got, p
        stages = [r["op"] for r in rows if r["provider"] == p and r["metric"] == "stage_time"]
        assert stages == [f"round:{s}" for s in bench_search.STAGES], p
    # per search: B*K*N = 2 candidates; timed, memory and split searches: 3 per provider
    assert count.rows == {"vae": 2 * 3 * 2, "preview": 2 * 3 * 2}
    assert compiled and {m for m, _ in compiled} == {"max-autotune"}
    table = bench_search.format_search_table(rows)
    assert "fused+preview+compile" in table.splitlines()[-8]  # the split's header line


@torch.no_grad()
def test_graph_variant_split_runs_the_captured_code(compiled) -> None:
    """A graph variant's split runs its stages inside enclosing_graph: the forward is the
    compilation without CUDA graphs that its captured round holds."""
    from smartgrpo_fast.search import NoiseSearch, SearchConfig

    cfg = bench_search.SearchBenchConfig(model="sd3-tiny", providers=("fused",), **SMALL)
    base, reward, cond = bench_search._model_and_cond(cfg)
    model = bench_search._Variants(cfg, base).model(("preview", "compile"))
    assert model.preview_decoder is not None and model.config.graph.backend == cfg.backend
    search = NoiseSearch(model, reward, SearchConfig(k=2, rounds=1, top=1, graph=False))
    mean = torch.randn((1, *model.latent_shape))
    staged = bench_search._FusedRound(search, mean, torch.full((1,), 0.3), 0.8, cond)
    bench_search._time_stages(staged, 1, torch.device("cpu"), warmup=0, repeats=1,
                              as_captured=True)  # fmt: skip
    assert compiled == [("default", True)]  # reduce-overhead's inner mode, inside


def _small_sd35(monkeypatch: pytest.MonkeyPatch) -> None:
    """sd35-medium's builders at a small width, same layout: patch 2, 16 latent channels,
    8x VAE and 8x TAESD3, so the bench's sd35-medium path runs at 512 px on a CPU."""
    from diffusers import AutoencoderKL, AutoencoderTiny, SD3Transformer2DModel

    def transformer_and_vae(*, dtype=torch.bfloat16, device="cpu", seed=0):
        torch.manual_seed(seed)
        t = SD3Transformer2DModel(**{**sd3_configs.TINY_TRANSFORMER, "sample_size": 64,
                                     "pos_embed_max_size": 64})  # fmt: skip
        vae = AutoencoderKL(**{**sd3_configs.SD3_VAE, "block_out_channels": (8, 8, 8, 8),
                               "norm_num_groups": 4, "layers_per_block": 1})  # fmt: skip
        return t.to(device, dtype).eval(), vae.to(device, dtype).eval()

    def taesd3(*, dtype=torch.float32, device="cpu", seed=0):
        torch.manual_seed(seed)
        dec = AutoencoderTiny(
            **{
                **sd3_configs.TAESD3,
                "decoder_block_out_channels": (8,) * 4,
                "encoder_block_out_channels": (8,) * 4,
                "num_decoder_blocks": (1,) * 4,
                "num_encoder_blocks": (1,) * 4,
            }
        )
        return torch.nn.Module.to(dec.to(device), dtype).eval()  # fmt: skip

    monkeypatch.setattr(sd3_configs, "random_sd35_medium", transformer_and_vae)
    monkeypatch.setattr(sd3_configs, "random_taesd3", taesd3)


@torch.no_grad()
def test_sd35_medium_path_with_the_preview_decoder(monkeypatch, tmp_path: Path) -> None:
    """``bench search --model sd35-medium --providers reference fused+preview``: the
    full-size layout's plumbing (a bare transformer + VAE pipe, 512 px, 8x TAESD3)."""
    _small_sd35(monkeypatch)
    count = _Rows(monkeypatch)
    argv = ["bench", "search", "--model", "sd35-medium", "--providers", "reference",
            "fused+preview", "--batch", "1", "--k", "2", "--rounds", "1", "--top", "1",
            "--repeats", "1", "--warmup", "0", "--device", "cpu", "--dtype", "float32",
            "--decode-size", "64", "--no-plot", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads((tmp_path / "search_sd35-medium_cpu_float32.json").read_text())
    assert {r["provider"] for r in rows} == {"reference", "fused+preview"}
    assert count.rows == {"vae": 6, "preview": 6}


def test_cli_provider_argument_error(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "search", "--providers", "fused+warp", "--device", "cpu"])
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "argument --providers" in last and "unknown option 'warp'" in last


def test_cli_missing_preview_folder(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "search", "--model", "sd3-tiny", "--providers", "fused+preview",
              "--preview-decoder", str(tmp_path), "--device", "cpu"])  # fmt: skip
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument --preview-decoder: {tmp_path / 'config.json'}: not found" in last
