"""The lookahead preview (issue 21): ``SearchConfig.preview_steps = m`` scores each candidate on
its estimate after m Euler steps to t = 0 (m velocity rows per candidate), in the fused search,
its captured round and the plain reference alike; m = 1 is the one-step estimate."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_float_order_close
from test_search import SHAPE, AnalyticFlow, PreparedTargetReward

from smartgrpo_fast.search import NoiseSearch, RolloutConfig, SearchConfig, search_reference
from smartgrpo_fast.search import cem as cem_module
from smartgrpo_fast.search.rollout import model_calls

PROMPTS = ["p0", "p1", "p2"]


class CountingFlow(AnalyticFlow):
    """AnalyticFlow recording the flow times of every velocity call."""

    def __init__(self, prompts):
        super().__init__(prompts)
        self.times: list[torch.Tensor] = []
        self.rows = 0

    def velocity(self, z, t, cond, k: int = 1):
        self.times.append(torch.as_tensor(t).clone())
        self.rows += z.shape[0]
        return super().velocity(z, t, cond, k)


def _inputs(b: int = 2):
    model = CountingFlow(PROMPTS)
    cond = model.encode_prompts(PROMPTS[:b])
    mean = torch.randn((b, *SHAPE), generator=torch.Generator().manual_seed(0))
    return model, PreparedTargetReward(PROMPTS), cond, mean


def test_preview_steps_validation_and_forward_rows() -> None:
    with pytest.raises(ValueError, match="preview_steps: expected an int >= 1"):
        SearchConfig(preview_steps=0)
    cfg = SearchConfig(k=16, rounds=3, preview_steps=4)
    assert cfg.model_calls == 48 and cfg.forward_rows == 4 * 48


@torch.no_grad()
@pytest.mark.parametrize("m", [2, 3])
def test_lookahead_matches_the_reference_and_steps_on_uniform_times(m: int) -> None:
    model, reward, cond, mean = _inputs()
    cfg = SearchConfig(k=4, rounds=2, top=2, preview_steps=m, graph=False)
    got = NoiseSearch(model, reward, cfg).run(mean, 0.4, 0.6, cond, seed=5)
    assert model.rows == m * 2 * 4 * 2  # m rows per candidate: B*K*N*m
    first_round = [float(t.flatten()[0]) for t in model.times[:m]]
    assert first_round == pytest.approx([0.6 * (1 - i / m) for i in range(m)])
    want = search_reference(model, reward, mean, 0.4, 0.6, cond, cfg, seed=5)
    for a, b in ((got.eps, want.eps), (got.best_reward, want.best_reward),
                 (got.rounds.best, want.rounds.best)):  # fmt: skip
        assert_float_order_close(a, b)


@torch.no_grad()
def test_lookahead_changes_what_is_scored() -> None:
    """m = 2 scores other estimates than m = 1 (this flow is not straight: v depends on z)."""
    model, reward, cond, mean = _inputs()
    one = NoiseSearch(model, reward, SearchConfig(k=4, rounds=1, top=2, graph=False))
    two = NoiseSearch(model, reward, SearchConfig(k=4, rounds=1, top=2, graph=False,
                                                  preview_steps=2))  # fmt: skip
    r1 = one.run(mean, 0.4, 0.6, cond, seed=5).rounds.mean
    r2 = two.run(mean, 0.4, 0.6, cond, seed=5).rounds.mean
    assert not torch.allclose(r1, r2)


@torch.no_grad()
def test_lookahead_in_the_captured_round(monkeypatch) -> None:
    """The captured round (on CPU: its closure) runs the m steps too, refilled per call."""

    def fake_capture(round_fn, device):
        round_fn()
        return round_fn

    monkeypatch.setattr(cem_module, "_graph_capable", lambda device: True)
    monkeypatch.setattr(cem_module, "_capture_round", fake_capture)
    model, reward, cond, mean = _inputs()
    cfg = SearchConfig(k=4, rounds=2, top=2, preview_steps=3)
    search = NoiseSearch(model, reward, cfg)
    for t in (0.6, 0.3):
        got = search.run(mean, 0.4, t, cond, seed=5)
        assert got.graphed
        want = search_reference(model, reward, mean, 0.4, t, cond, cfg, seed=5)
        assert_float_order_close(got.eps, want.eps)


def test_model_calls_count_the_lookahead_forwards() -> None:
    rollout = RolloutConfig(steps=10, step=2)
    calls = model_calls(SearchConfig(k=4, rounds=2, preview_steps=3), rollout, 2.0)
    assert calls["searched"]["transformer_rows"] == 2 * (10 + 3 * 4 * 2)
    assert calls["searched"]["decodes"] == 1 + 8 and calls["searched"]["reward_images"] == 9
    assert calls["random"]["transformer_rows"] == 2 * 10


def test_cli_preview_steps(tmp_path) -> None:
    import json

    from smartgrpo_fast.cli import main

    argv = ["search", "--num-prompts", "2", "--k", "2", "--rounds", "1", "--top", "1",
            "--preview-steps", "2", "--steps", "3", "--step", "1", "--device", "cpu",
            "--no-progress", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["config"]["search"]["preview_steps"] == 2
    per = res["model_calls"]["per_rollout"]
    assert per["searched"]["transformer_rows"] == 2 * (3 + 2 * 2 * 1)  # guidance: 2 rows each
    assert per["searched"]["decodes"] == 1 + 2 and per["searched"]["preview_decodes"] == 0
