"""The search's forwards run on the model's configured backend (issue 21): inside the captured
round, where graphs of the backend's own cannot nest, the compile backends run their
compilation without CUDA graphs (warmed up and captured alike) and ``graph`` calls the
function directly; stage by stage, the backend as configured. On CPU: torch.compile is
replaced by a recorder and the round's capture by the Python closure (as in test_search)."""

from __future__ import annotations

import pytest
import torch
from test_search import SHAPE, AnalyticFlow, PreparedTargetReward

from smartgrpo_fast.graphs import (
    INNER_COMPILE_MODES,
    GraphConfig,
    GraphedCallable,
    enclosing_graph,
    in_enclosing_graph,
)
from smartgrpo_fast.search import NoiseSearch, SearchConfig, search_reference
from smartgrpo_fast.search import cem as cem_module

PROMPTS = ["p0", "p1", "p2"]


class BackendFlow(AnalyticFlow):
    """AnalyticFlow whose velocity goes through a GraphedCallable on ``backend``."""

    def __init__(self, prompts: list[str], backend: str) -> None:
        super().__init__(prompts)
        self._forward = GraphedCallable(self._rows, GraphConfig(backend=backend))

    @staticmethod
    def _rows(z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return (0.5 * z.float() + c).to(z.dtype)  # AnalyticFlow's velocity

    def velocity(self, z, t, cond, k: int = 1):
        c = cond.prompt_embeds[:, 0].repeat_interleave(k, 0).view(-1, *SHAPE)
        return self._forward(z, c)


@pytest.fixture
def captured_round(monkeypatch: pytest.MonkeyPatch) -> list[list]:
    """A round's capture on CPU: the closure runs once (as a capture traces it) and is its
    own replay; records, per capture, whether it ran inside an enclosing graph."""
    seen: list[bool] = []

    def fake_capture(round_fn, device):
        seen.append(in_enclosing_graph())
        round_fn()
        return round_fn

    monkeypatch.setattr(cem_module, "_graph_capable", lambda device: True)
    monkeypatch.setattr(cem_module, "_capture_round", fake_capture)
    return seen


def test_enclosing_graph_nests_and_restores() -> None:
    assert not in_enclosing_graph()
    with enclosing_graph():
        with enclosing_graph():
            assert in_enclosing_graph()
        assert in_enclosing_graph()
    assert not in_enclosing_graph()
    with pytest.raises(KeyError), enclosing_graph():
        raise KeyError("x")
    assert not in_enclosing_graph()


@pytest.mark.parametrize("backend", ["compile-reduce-overhead", "compile-max-autotune"])
def test_compile_backend_inside_an_enclosing_graph_compiles_without_graphs(
    compiled, backend: str
) -> None:
    g = GraphedCallable(lambda x: x * 2, GraphConfig(backend=backend))
    x = torch.ones(2, 3)
    mode = backend.removeprefix("compile-")
    assert torch.equal(g(x), x * 2)
    with enclosing_graph():
        assert torch.equal(g(x), x * 2)
        assert torch.equal(g(x), x * 2)
    assert compiled == [(mode, False), (INNER_COMPILE_MODES[mode], True),
                        (INNER_COMPILE_MODES[mode], True)]  # fmt: skip
    assert INNER_COMPILE_MODES[mode] in ("default", "max-autotune-no-cudagraphs")
    assert g.stats.inner_calls == 2


def test_graph_backend_inside_an_enclosing_graph_calls_the_function() -> None:
    g = GraphedCallable(lambda x: x + 1, GraphConfig(backend="graph"))
    with enclosing_graph():
        assert torch.equal(g(torch.zeros(2, 2)), torch.ones(2, 2))
    assert g.stats.inner_calls == 1 and g.stats.eager_calls == 0 and g.stats.captures == 0


@torch.no_grad()
@pytest.mark.parametrize("backend", ["compile-reduce-overhead", "compile-max-autotune"])
def test_search_round_captures_the_compiled_forward(compiled, captured_round, backend) -> None:
    """Warm-up and capture of the round both run the forward's compilation without graphs
    (one compilation, used twice); the result equals the plain reference search."""
    model = BackendFlow(PROMPTS, backend)
    reward = PreparedTargetReward(PROMPTS)
    cfg = SearchConfig(k=4, rounds=2, top=2)
    cond = model.encode_prompts(PROMPTS[:2])
    mean = torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(0))
    got = NoiseSearch(model, reward, cfg).run(mean, 0.4, 0.6, cond, seed=3)
    assert got.graphed and captured_round == [True]
    inner = INNER_COMPILE_MODES[backend.removeprefix("compile-")]
    # warm-up round, captured round, then the fake replays (Python again, outside: these
    # would be graph replays on CUDA, which run no Python)
    assert compiled[:2] == [(inner, True), (inner, True)]
    assert all(not inside for _, inside in compiled[2:])
    want = search_reference(model, reward, mean, 0.4, 0.6, cond, cfg, seed=3)
    assert torch.allclose(got.eps, want.eps, atol=2e-5)


@torch.no_grad()
def test_stage_by_stage_uses_the_backend_as_configured(compiled) -> None:
    model = BackendFlow(PROMPTS, "compile-max-autotune")
    cfg = SearchConfig(k=4, rounds=2, top=2, graph=False)
    cond = model.encode_prompts(PROMPTS[:2])
    mean = torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(0))
    res = NoiseSearch(model, PreparedTargetReward(PROMPTS), cfg).run(mean, 0.4, 0.6, cond)
    assert not res.graphed and compiled == [("max-autotune", False)] * 2
