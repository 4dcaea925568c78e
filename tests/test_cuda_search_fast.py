"""On a GPU (issue 21): the captured search round with a preview decoder, with the compiled
transformer inside it, and float8 search forwards, each against the stage-by-stage search. The
tiny random SD3 pipeline and a tiny random AutoencoderTiny, built in memory. The compile test
compiles the tiny transformer once (tens of seconds): run this file as its own step."""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch

pytestmark = pytest.mark.cuda
PROMPTS = ["a red circle on a blue background", "a green square on a white background"]


def _model(backend: str = "eager", preview: bool = True):
    pytest.importorskip("diffusers")
    from smartgrpo_fast.graphs import GraphConfig
    from smartgrpo_fast.models.sd3 import SD3Config, SD3FlowModel
    from smartgrpo_fast.models.sd3_configs import (
        build_tiny_preview_decoder,
        build_tiny_sd3_pipeline,
    )

    pipe = build_tiny_sd3_pipeline(seed=0).to("cuda")
    dec = build_tiny_preview_decoder(seed=1).to("cuda") if preview else None
    cfg = SD3Config(graph=GraphConfig(backend=backend))
    return SD3FlowModel(pipe, cfg, name="tiny-random", preview_decoder=dec)


def _run(model, cfg, seed: int = 3):
    from smartgrpo_fast import rewards
    from smartgrpo_fast.search import NoiseSearch

    reward = rewards.load("tiny-color", device="cuda")
    cond = model.encode_prompts(PROMPTS)
    gen = torch.Generator(device="cuda").manual_seed(0)
    mean = torch.randn((2, *model.latent_shape), device="cuda", generator=gen)
    search = NoiseSearch(model, reward, cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = search.run(mean, 0.3, 0.8, cond, seed=seed)
    fallbacks = [str(w.message) for w in caught if "NoiseSearch" in str(w.message)]
    return res, fallbacks, search


@torch.no_grad()
def test_captured_round_with_a_preview_decoder() -> None:
    from smartgrpo_fast.search import SearchConfig

    model = _model()
    cfg = SearchConfig(k=8, rounds=3, top=2)
    got, fallbacks, _ = _run(model, cfg)
    assert got.graphed and not fallbacks, fallbacks
    want, _, _ = _run(model, replace(cfg, graph=False))
    torch.testing.assert_close(got.rounds.best, want.rounds.best, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.eps, want.eps, atol=1e-4, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("backend", ["compile-reduce-overhead"])
def test_captured_round_runs_the_compiled_forward(backend: str) -> None:
    """The round captures the transformer's compilation without CUDA graphs (no fallback
    warning); its first round's rewards (the same candidates: later rounds follow elites
    that float order may reorder) match the eager stage-by-stage search's."""
    from smartgrpo_fast.search import SearchConfig

    compiled = _model(backend)
    cfg = SearchConfig(k=8, rounds=3, top=2)
    got, fallbacks, _ = _run(compiled, cfg)
    assert got.graphed and not fallbacks, fallbacks
    assert compiled._forward.stats.inner_calls >= 2  # warm-up and capture, inside
    want, _, _ = _run(_model("eager"), replace(cfg, graph=False))
    torch.testing.assert_close(got.rounds.mean[0], want.rounds.mean[0], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(got.rounds.best[0], want.rounds.best[0], atol=2e-3, rtol=2e-3)


@torch.no_grad()
def test_float8_search_model() -> None:
    cap = torch.cuda.get_device_capability()
    if cap < (8, 9):
        pytest.skip(f"float8 needs compute capability >= 8.9, this GPU has {cap}")
    pytest.importorskip("torchao")
    from smartgrpo_fast.search import SearchConfig

    model = _model()
    model.transformer.to(torch.bfloat16)
    model.dtype = torch.bfloat16
    fast = model.for_search("float8")
    assert fast is model.for_search("float8") and fast.dtype == torch.bfloat16
    assert fast.vae is model.vae and fast.preview_decoder is model.preview_decoder
    cond = model.encode_prompts(PROMPTS[:1])
    z = torch.randn((4, *model.latent_shape), device="cuda")
    v, v8 = model.velocity(z, 0.7, cond, k=4), fast.velocity(z, 0.7, cond, k=4)
    rel = float((v8.float() - v.float()).norm() / v.float().norm())
    assert rel < 0.25, rel  # float8 rounding of a random tiny transformer
    got, fallbacks, _ = _run(fast, SearchConfig(k=8, rounds=2, top=2))
    assert got.graphed == (not fallbacks)  # captured, or stage by stage saying why
    assert torch.isfinite(got.best_reward).all()
