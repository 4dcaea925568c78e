"""NoiseSearch against search.reference, its edge cases, and the whole-round graph path.

A small analytic flow model keeps these fast: ``v = 0.5 z + c_p`` (c_p a per-prompt constant
image), ``decode`` a sigmoid, and a reward that is the negative distance of the decoded image
to a per-prompt target — smooth, so that CEM has a direction to find, and cheap.
"""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from helpers import assert_float_order_close

from smartgrpo_fast.models.base import Cond, repeat_rows
from smartgrpo_fast.ops import philox_normal
from smartgrpo_fast.rewards.base import PreparedPrompts
from smartgrpo_fast.search import NoiseSearch, SearchConfig, search_reference
from smartgrpo_fast.search import cem as cem_module

SHAPE = (3, 8, 8)
# Tolerances: both sides compute in float32; the fused path forms z = mean + scale*(mu +
# sigma*n) in one expression, the reference materialises eps first (a few ulps apart).
ATOL = 2e-5


class AnalyticFlow:
    """FlowModel stand-in: v = 0.5 z + c_p, decode = sigmoid, latents scaled by 2 and shifted."""

    latent_shape = SHAPE
    scaling_factor = 2.0
    shift_factor = 0.1

    def __init__(self, prompts: list[str]) -> None:
        gen = torch.Generator().manual_seed(1)
        self.offsets = {p: torch.randn(SHAPE, generator=gen) * 0.3 for p in prompts}
        self.device = torch.device("cpu")
        self.calls = 0

    def encode_prompts(self, prompts: list[str]) -> Cond:
        emb = torch.stack([self.offsets[p] for p in prompts]).flatten(1).unsqueeze(1)
        return Cond(emb, emb[:, 0], prompts=tuple(prompts))

    def velocity(self, z: torch.Tensor, t, cond: Cond, k: int = 1) -> torch.Tensor:
        self.calls += 1
        c = repeat_rows(cond.prompt_embeds[:, 0], k).view(-1, *SHAPE)
        return (0.5 * z.float() + c).to(z.dtype)

    def decode(self, x0: torch.Tensor, *, size: int | None = None) -> torch.Tensor:
        img = torch.sigmoid(x0.float())
        if size is not None:
            img = torch.nn.functional.interpolate(img, size=(size, size), mode="bilinear")
        return img


class TargetReward:
    """-mean |image - target_p|^2, optional NaN/inf injected at given flat indices."""

    def __init__(self, prompts: list[str], bad: dict[int, float] | None = None) -> None:
        gen = torch.Generator().manual_seed(2)
        self.targets = {p: torch.rand(SHAPE, generator=gen) for p in prompts}
        self.bad = bad or {}
        self.calls = 0

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.calls += 1
        tgt = torch.stack([self.targets[p] for p in prompts])
        if tgt.shape != images.shape:
            tgt = torch.nn.functional.interpolate(tgt, size=images.shape[-2:], mode="bilinear")
        r = -((images - tgt) ** 2).flatten(1).mean(1)
        for i, value in self.bad.items():
            r[i] = value
        return r


PROMPTS = ["p0", "p1", "p2"]


def setup(b: int = 2, bad: dict[int, float] | None = None, seed: int = 0):
    model = AnalyticFlow(PROMPTS)
    reward = TargetReward(PROMPTS, bad)
    cond = model.encode_prompts(PROMPTS[:b])
    mean = torch.randn((b, *SHAPE), generator=torch.Generator().manual_seed(seed))
    return model, reward, cond, mean


def assert_same(a, b, atol: float = ATOL) -> None:
    torch.testing.assert_close(a.eps, b.eps, atol=atol, rtol=0)
    torch.testing.assert_close(a.mu, b.mu, atol=atol, rtol=0)
    torch.testing.assert_close(a.sigma, b.sigma, atol=atol, rtol=0)
    torch.testing.assert_close(a.best_reward, b.best_reward, atol=atol, rtol=0, equal_nan=True)
    for f in ("best", "elite_mean", "mean"):
        torch.testing.assert_close(
            getattr(a.rounds, f), getattr(b.rounds, f), atol=atol, rtol=0, equal_nan=True
        )
    assert torch.equal(a.rounds.nan_count, b.rounds.nan_count)
    assert (a.velocity is None) == (b.velocity is None)
    if a.velocity is not None:
        torch.testing.assert_close(a.velocity, b.velocity, atol=atol, rtol=0)


CASES = [
    dict(),
    dict(use="mean"),
    dict(use="sample"),
    dict(use="best", per_element=False),
    dict(use="mean", per_element=False, alpha=0.5, min_sigma=0.3),
    dict(k=1, top=1, rounds=2, use="mean"),  # K = 1: the only candidate is the elite
    dict(k=5, top=5, rounds=2),  # T = K
    dict(k=6, top=1, rounds=3, use="mean"),  # T = 1: sigma collapses to min_sigma
    dict(strategy="best_of", k=4, rounds=3, top=2),
    dict(use="mean", rescale=True, mu0=0.2, sigma0=0.7),
    dict(decode_size=4, k=4, rounds=2, top=2),
]


@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_matches_reference(kw: dict, b: int) -> None:
    model, reward, cond, mean = setup(b)
    cfg = SearchConfig(**{"k": 8, "rounds": 3, "top": 3, **kw})
    scale = torch.linspace(0.3, 0.5, b)
    got = NoiseSearch(model, reward, cfg).run(mean, scale, 0.6, cond, seed=11)
    want = search_reference(model, reward, mean, scale, 0.6, cond, cfg, seed=11)
    assert_same(got, want)
    assert got.eps.shape == mean.shape and got.eps.dtype == torch.float32
    assert got.rounds.best.shape == (cfg.rounds, b)
    assert got.candidates == cfg.k * cfg.rounds


@pytest.mark.slow
def test_matches_reference_every_backend(backend: str) -> None:
    model, reward, cond, mean = setup(2)
    cfg = SearchConfig(k=6, rounds=2, top=2, use="mean", alpha=0.8, min_sigma=0.05)
    got = NoiseSearch(model, reward, cfg).run(mean, 0.4, 0.5, cond, seed=3)
    want = search_reference(model, reward, mean, 0.4, 0.5, cond, cfg, seed=3)
    assert_same(got, want)


def test_one_call_per_round() -> None:
    """Each round is one batched velocity and one reward call, whatever B and K."""
    model, reward, cond, mean = setup(3)
    NoiseSearch(model, reward, SearchConfig(k=8, rounds=4, top=2)).run(mean, 0.4, 0.5, cond)
    assert model.calls == 4 and reward.calls == 4


def test_cem_climbs() -> None:
    """On a smooth reward the elites' mean reward rises round over round, and the searched
    noise beats the prior's average candidate."""
    model, reward, cond, mean = setup(3)
    cfg = SearchConfig(k=32, rounds=5, top=6, use="mean", alpha=0.7)
    res = NoiseSearch(model, reward, cfg).run(mean, 1.0, 0.5, cond, seed=5)
    elite = res.rounds.elite_mean.mean(1)
    assert bool((elite[1:] > elite[:-1]).all()), elite
    assert bool((res.rounds.mean[-1] > res.rounds.mean[0]).all())


def one_step_reward(model, reward, cond, mean, scale, t, eps) -> torch.Tensor:
    z = mean + scale * eps
    x0 = (z - t * model.velocity(z, t, cond)) / model.scaling_factor + model.shift_factor
    return reward(model.decode(x0), list(cond.prompts))


@pytest.mark.parametrize("strategy", ["cem", "best_of"])
def test_best_is_the_best_candidate(strategy: str) -> None:
    """use='best' returns the noise whose one-step reward is best_reward, and best_reward is
    the maximum of every round's best."""
    model, reward, cond, mean = setup(3)
    cfg = SearchConfig(k=8, rounds=3, top=2, use="best", strategy=strategy)
    res = NoiseSearch(model, reward, cfg).run(mean, 0.5, 0.4, cond, seed=9)
    torch.testing.assert_close(res.best_reward, res.rounds.best.max(0).values)
    again = one_step_reward(model, reward, cond, mean, 0.5, 0.4, res.eps)
    torch.testing.assert_close(again, res.best_reward, atol=1e-5, rtol=0)
    if strategy == "best_of":  # no refinement: mu and sigma stay at the prior
        assert bool((res.mu == 0).all()) and bool((res.sigma == 1).all())


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(strategy="best_of"), dict(per_element=False), dict(preview_steps=3)],
    ids=["cem", "best_of", "pooled", "lookahead"],
)
def test_velocity_is_the_models_at_the_chosen_noise(kw: dict) -> None:
    """SearchResult.velocity is v(mean + scale * eps, t_next): the forward a rollout's next
    step would make (the first forward of a lookahead), found by the search already."""
    model, reward, cond, mean = setup(3)
    cfg = SearchConfig(**{"k": 8, "rounds": 3, "top": 2, **kw})
    res = NoiseSearch(model, reward, cfg).run(mean, 0.5, 0.4, cond, seed=9)
    assert cfg.keeps_velocity and res.velocity is not None
    assert res.velocity.shape == mean.shape and res.velocity.dtype == torch.float32
    x_next = mean + 0.5 * res.eps
    torch.testing.assert_close(res.velocity, model.velocity(x_next, 0.4, cond), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kw", [dict(use="mean"), dict(use="sample"), dict(rescale=True)])
def test_no_velocity_when_the_noise_was_not_evaluated(kw: dict) -> None:
    model, reward, cond, mean = setup(2)
    cfg = SearchConfig(k=4, rounds=2, top=2, **kw)
    assert not cfg.keeps_velocity
    assert NoiseSearch(model, reward, cfg).run(mean, 0.5, 0.4, cond, seed=9).velocity is None


def test_nan_and_inf_rank_last_and_are_counted() -> None:
    """Candidate rewards NaN or +-inf never become elites or the best; counted per round."""
    k, b = 6, 2
    bad = {0: float("nan"), 1: float("inf"), 2: float("-inf"), k + 3: float("nan")}
    model, reward, cond, mean = setup(b, bad)
    cfg = SearchConfig(k=k, rounds=2, top=3, use="best")
    res = NoiseSearch(model, reward, cfg).run(mean, 0.5, 0.5, cond, seed=1)
    assert res.rounds.nan_count.tolist() == [[3, 1], [3, 1]]
    assert bool(torch.isfinite(res.rounds.elite_mean).all())
    assert bool(torch.isfinite(res.best_reward).all())
    assert_same(res, search_reference(model, reward, mean, 0.5, 0.5, cond, cfg, seed=1))


def _half_nan_setup(b: int, k: int, all_nan_row: int | None = None):
    prompts = [f"q{i}" for i in range(b)]
    model = AnalyticFlow(prompts)
    reward = PreparedTargetReward(prompts)
    mask = torch.rand(b, k, generator=torch.Generator().manual_seed(3)) < 0.5
    if all_nan_row is not None:
        mask[all_nan_row] = True
    reward.bad = {int(i): float("nan") for i in mask.flatten().nonzero().flatten()}
    cond = model.encode_prompts(prompts)
    mean = torch.randn((b, *SHAPE), generator=torch.Generator().manual_seed(4))
    return model, reward, cond, mean, mask


def test_nan_candidates_never_enter_the_cem_mean() -> None:
    """64 rollouts, a reward NaN for a random half of the K = 8 candidates (T = 6), one row NaN
    throughout: after one round (alpha 1) each row's mu is exactly the mean of its finite
    elites' noise (materialised here from Philox), sigma their std; the all-NaN row keeps
    mu0 and sigma0."""
    b, k, top, seed, nan_row = 64, 8, 6, 5, 17
    model, reward, cond, mean, mask = _half_nan_setup(b, k, nan_row)
    cfg = SearchConfig(k=k, rounds=1, top=top, use="mean", mu0=0.1, sigma0=0.9)
    res = NoiseSearch(model, reward, cfg).run(mean, 0.5, 0.6, cond, seed=seed)
    eps = cfg.mu0 + cfg.sigma0 * philox_normal((b, k, *SHAPE), seed=seed, round=0)
    cond_k = model.encode_prompts([p for p in cond.prompts for _ in range(k)])
    mean_k = mean.unsqueeze(1).expand(b, k, *SHAPE).flatten(0, 1)
    r = one_step_reward(model, reward, cond_k, mean_k, 0.5, 0.6, eps.flatten(0, 1)).view(b, k)
    assert torch.equal(torch.isnan(r), mask)
    short = 0
    for i in range(b):
        finite = (~mask[i]).nonzero().flatten()
        if finite.numel() == 0:
            torch.testing.assert_close(res.mu[i], torch.full(SHAPE, cfg.mu0), atol=0, rtol=0)
            torch.testing.assert_close(res.sigma[i], torch.full(SHAPE, cfg.sigma0), atol=0, rtol=0)
            continue
        best = finite[r[i, finite].argsort(descending=True, stable=True)][:top]
        short += int(finite.numel() < top)
        torch.testing.assert_close(res.mu[i], eps[i, best].mean(0), atol=ATOL, rtol=0)
        sd = eps[i, best].var(0, unbiased=False).sqrt()
        torch.testing.assert_close(res.sigma[i], sd, atol=ATOL, rtol=0)
    assert short >= 10  # the case the fix is about: rows with fewer than T finite rewards
    assert bool(torch.isfinite(res.mu).all()) and bool(torch.isfinite(res.sigma).all())


@pytest.mark.parametrize("use", ["best", "mean", "sample"])
@pytest.mark.parametrize("per_element", [True, False], ids=["per_element", "pooled"])
def test_rows_with_few_or_no_finite_rewards_match_the_reference(use, per_element) -> None:
    """The three cases of a round with NaN rewards against search_reference over 3 rounds:
    rows with fewer than T finite rewards update from those, an all-NaN row keeps mu and
    sigma, and use='best' never picks a non-finite candidate."""
    b, k, top = 16, 8, 6
    model, reward, cond, mean, _ = _half_nan_setup(b, k, all_nan_row=3)
    cfg = SearchConfig(k=k, rounds=3, top=top, use=use, per_element=per_element, alpha=0.7,
                       min_sigma=0.05)  # fmt: skip
    got = NoiseSearch(model, reward, cfg).run(mean, 0.5, 0.6, cond, seed=2, row_offset=5)
    want = search_reference(model, reward, mean, 0.5, 0.6, cond, cfg, seed=2, row_offset=5)
    assert_same(got, want)
    assert bool(torch.isfinite(got.mu).all()) and bool(torch.isfinite(got.sigma).all())
    torch.testing.assert_close(got.mu[3], torch.zeros(SHAPE), atol=0, rtol=0)  # mu0, sigma0
    assert bool((got.sigma[3] == 1).all())
    assert math.isnan(float(got.best_reward[3]))
    if use == "best":  # every other row's eps is its best finite candidate's
        clean = PreparedTargetReward(list(cond.prompts))  # the same targets, no NaN
        again = one_step_reward(model, clean, cond, mean, 0.5, 0.6, got.eps)
        rows = [i for i in range(b) if i != 3]
        torch.testing.assert_close(again[rows], got.best_reward[rows], atol=1e-5, rtol=0)
        torch.testing.assert_close(got.eps[3], got.mu[3], atol=0, rtol=0)


def test_all_nan_row_falls_back_to_mean() -> None:
    k = 4
    model, reward, cond, mean = setup(2, {i: float("nan") for i in range(k)})  # row 0 all NaN
    res = NoiseSearch(model, reward, SearchConfig(k=k, rounds=2, top=2)).run(mean, 0.5, 0.5, cond)
    assert math.isnan(float(res.best_reward[0])) and math.isfinite(float(res.best_reward[1]))
    assert torch.isnan(res.rounds.best[:, 0]).all() and res.rounds.nan_count[0, 0] == k
    torch.testing.assert_close(res.eps[0], res.mu[0])
    assert bool(torch.isfinite(res.eps).all())


def test_seeds() -> None:
    model, reward, cond, mean = setup(2)
    search = NoiseSearch(model, reward, SearchConfig(k=4, rounds=2, top=2))
    a, b = search.run(mean, 0.5, 0.5, cond, seed=1), search.run(mean, 0.5, 0.5, cond, seed=1)
    c = search.run(mean, 0.5, 0.5, cond, seed=2)
    assert torch.equal(a.eps, b.eps) and not torch.equal(a.eps, c.eps)


def test_non_contiguous_mean() -> None:
    model, reward, cond, mean = setup(2)
    wide = torch.zeros((2, 3, 8, 16))
    wide[..., ::2] = mean
    strided = wide[..., ::2]
    assert not strided.is_contiguous()
    cfg = SearchConfig(k=4, rounds=2, top=2)
    got = NoiseSearch(model, reward, cfg).run(strided, 0.5, 0.5, cond, seed=4)
    assert_same(got, NoiseSearch(model, reward, cfg).run(mean, 0.5, 0.5, cond, seed=4))


def test_rescale_norm() -> None:
    model, reward, cond, mean = setup(3)
    cfg = SearchConfig(k=8, rounds=2, top=4, use="mean", rescale=True)
    res = NoiseSearch(model, reward, cfg).run(mean, 0.5, 0.5, cond)
    d = math.prod(SHAPE)
    torch.testing.assert_close(res.eps.flatten(1).norm(dim=1), torch.full((3,), math.sqrt(d)))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(k=0), "k: expected an int >= 1"),
        (dict(top=5, k=4), "top: expected 1 <= top <= k = 4"),
        (dict(rounds=True), "rounds"),
        (dict(alpha=0.0), "alpha"),
        (dict(sigma0=0.0), "sigma0"),
        (dict(min_sigma=float("nan")), "min_sigma"),
        (dict(use="median"), "use: expected one of mean, sample, best"),
        (dict(strategy="random"), "strategy"),
        (dict(seed=-1), "seed"),
        (dict(decode_size=0), "decode_size"),
    ],
)
def test_config_errors(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SearchConfig(**kw)


def test_input_errors() -> None:
    model, reward, cond, mean = setup(2)
    search = NoiseSearch(model, reward, SearchConfig(k=4, rounds=1, top=2))
    with pytest.raises(ValueError, match=r"mean: expected \(B, 3, 8, 8\)"):
        search.run(mean[:, :2], 0.5, 0.5, cond)
    bad = mean.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="mean: 1 non-finite"):
        search.run(bad, 0.5, 0.5, cond)
    with pytest.raises(ValueError, match="scale: expected finite values >= 0"):
        search.run(mean, -1.0, 0.5, cond)
    with pytest.raises(ValueError, match=r"scale: expected a float or a \(2,\) tensor"):
        search.run(mean, torch.ones(3), 0.5, cond)
    with pytest.raises(ValueError, match="t_next: expected a flow time"):
        search.run(mean, 0.5, 1.5, cond)
    with pytest.raises(ValueError, match="cond: expected B = 2 prompts"):
        search.run(mean, 0.5, 0.5, model.encode_prompts(PROMPTS))
    with pytest.raises(TypeError, match="cond: expected a Cond"):
        search.run(mean, 0.5, 0.5, "p0")
    with pytest.raises(ValueError, match="seed"):
        search.run(mean, 0.5, 0.5, cond, seed=-3)
    with pytest.raises(TypeError, match="model: expected a FlowModel"):
        NoiseSearch(object(), reward)


def test_reward_shape_error() -> None:
    model, _, cond, mean = setup(2)
    search = NoiseSearch(model, lambda images, prompts: torch.zeros(3), SearchConfig(k=4, top=2))
    with pytest.raises(ValueError, match=r"reward: expected a \(8,\) tensor for 8 images"):
        search.run(mean, 0.5, 0.5, cond)


class PreparedTargetReward(TargetReward):
    """TargetReward split into prepare (the targets as one tensor) and score (tensors only)."""

    def prepare(self, prompts: list[str], device=None) -> PreparedPrompts:
        tgt = torch.stack([self.targets[p] for p in prompts])
        return PreparedPrompts(tuple(prompts), {"target": tgt})

    def score(self, images: torch.Tensor, prepared: PreparedPrompts) -> torch.Tensor:
        self.calls += 1
        tgt = prepared.tensors["target"]
        if tgt.shape != images.shape:
            tgt = torch.nn.functional.interpolate(tgt, size=images.shape[-2:], mode="bilinear")
        r = -((images - tgt) ** 2).flatten(1).mean(1)
        for i, value in self.bad.items():
            r[i] = value
        return r

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.score(images, self.prepare(prompts))


GRAPH_PROMPTS = ["p0", "p1", "p2", "p3", "p4"]


@pytest.fixture
def fake_graphs(monkeypatch: pytest.MonkeyPatch) -> list:
    """Graphs on CPU: a capture runs the round's Python once (as a real capture traces it; its
    effects must be undone) and its replay re-runs that same closure on the same static
    tensors, so whatever a call fails to refill in place is stale in the replay."""
    captured: list = []

    def fake_capture(round_fn, device):
        round_fn()
        captured.append(round_fn)
        return round_fn

    monkeypatch.setattr(cem_module, "_graph_capable", lambda device: True)
    monkeypatch.setattr(cem_module, "_capture_round", fake_capture)
    return captured


# (B, prompts, mean seed, scale, t_next, seed, row_offset): new prompts, rows, scales, times,
# seeds and row offsets per call, two batch sizes interleaved.
GRAPH_CALLS = [
    (2, ["p0", "p1"], 0, 0.4, 0.5, 8, 0),
    (2, ["p3", "p2"], 1, 0.3, 0.7, 9, 2),
    (3, ["p4", "p0", "p2"], 2, 0.5, 0.6, 10, 0),
    (2, ["p1", "p1"], 3, 0.6, 0.4, 8, 7),
    (3, ["p1", "p3", "p4"], 4, 0.2, 0.5, 11, 3),
    (2, ["p4", "p0"], 5, 0.4, 0.9, 12, 0),
]


@pytest.mark.parametrize(
    "kw", [dict(use="mean", alpha=0.8), dict(use="best", per_element=False, min_sigma=0.1)],
    ids=["per_element", "pooled"],
)  # fmt: skip
def test_graph_is_captured_once_per_shape_and_refilled_per_call(fake_graphs, kw: dict) -> None:
    """One capture per batch size over many run() calls with other prompts, rows, scales,
    times and seeds; every call equals search_reference, and an earlier result is not
    overwritten by a later call (no aliasing of the static buffers)."""
    model = AnalyticFlow(GRAPH_PROMPTS)
    reward = PreparedTargetReward(GRAPH_PROMPTS)
    cfg = SearchConfig(k=6, rounds=3, top=2, **kw)
    search = NoiseSearch(model, reward, cfg)
    kept = []
    for b, prompts, mseed, scale, t, seed, offset in GRAPH_CALLS:
        cond = model.encode_prompts(prompts)
        mean = torch.randn((b, *SHAPE), generator=torch.Generator().manual_seed(mseed))
        before = reward.calls
        got = search.run(mean, scale, t, cond, seed=seed, row_offset=offset)
        first = sum(1 for c in GRAPH_CALLS[: len(kept) + 1] if c[0] == b) == 1
        # a new batch size: warm-up round + captured round (both undone), then N replays
        assert reward.calls - before == cfg.rounds + (2 if first else 0)
        want = search_reference(
            model, reward, mean, scale, t, cond, cfg, seed=seed, row_offset=offset
        )
        assert got.graphed
        assert_same(got, want)
        kept.append((got, want))
    for got, want in kept:
        assert_same(got, want)
    assert len(fake_graphs) == 2
    stats = search.graph_stats
    assert (stats.captures, stats.recaptures, stats.eager_calls) == (2, 0, 0)
    assert stats.replays == cfg.rounds * len(GRAPH_CALLS)


def test_graph_of_a_reward_without_prepare_is_recaptured_for_new_prompts(fake_graphs) -> None:
    """A reward called with prompt strings cannot be refilled: new prompts, new capture."""
    model = AnalyticFlow(GRAPH_PROMPTS)
    reward = TargetReward(GRAPH_PROMPTS)
    cfg = SearchConfig(k=4, rounds=2, top=2, use="mean")
    search = NoiseSearch(model, reward, cfg)
    mean = torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(0))
    for prompts in (["p0", "p1"], ["p0", "p1"], ["p2", "p3"]):
        cond = model.encode_prompts(prompts)
        got = search.run(mean, 0.4, 0.5, cond, seed=3)
        assert got.graphed
        assert_same(got, search_reference(model, reward, mean, 0.4, 0.5, cond, cfg, seed=3))
    assert (search.graph_stats.captures, search.graph_stats.recaptures) == (2, 1)


def test_graph_off_or_not_cuda_runs_per_stage(fake_graphs) -> None:
    model, reward, cond, mean = setup(2)
    cfg = SearchConfig(k=4, rounds=2, top=2, graph=False)
    search = NoiseSearch(model, reward, cfg)
    assert not search.run(mean, 0.4, 0.5, cond, seed=8).graphed
    assert search.graph_stats.eager_calls == 2 and search.graph_stats.captures == 0
    assert not fake_graphs


def test_graph_capture_failure_is_remembered_per_shape(monkeypatch, fake_graphs) -> None:
    """A capture that fails (after changing the state: undone) sends that shape per stage for
    good with one warning; another batch size still captures."""
    capture = cem_module._capture_round
    attempts: list[int] = []

    def first_capture_fails(round_fn, device):  # the first capture is B = 2's
        attempts.append(1)
        if len(attempts) == 1:
            round_fn()  # half a capture that changed the state: must be undone
            raise RuntimeError("operation not permitted when stream is capturing")
        return capture(round_fn, device)

    monkeypatch.setattr(cem_module, "_capture_round", first_capture_fails)
    model = AnalyticFlow(GRAPH_PROMPTS)
    reward = PreparedTargetReward(GRAPH_PROMPTS)
    cfg = SearchConfig(k=4, rounds=2, top=2)
    search = NoiseSearch(model, reward, cfg)
    cond2, cond3 = model.encode_prompts(["p0", "p1"]), model.encode_prompts(["p2", "p3", "p4"])
    mean2, mean3 = torch.randn((2, *SHAPE)), torch.randn((3, *SHAPE))
    with pytest.warns(RuntimeWarning, match="stage by stage for B=2.*not permitted"):
        got = search.run(mean2, 0.4, 0.5, cond2, seed=2)
    assert not got.graphed
    assert_same(got, search_reference(model, reward, mean2, 0.4, 0.5, cond2, cfg, seed=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning only: later runs go per stage quietly
        assert not search.run(mean2, 0.4, 0.5, cond2, seed=2).graphed
        got3 = search.run(mean3, 0.4, 0.5, cond3, seed=2)
    assert got3.graphed  # the failure was B = 2's only
    assert_same(got3, search_reference(model, reward, mean3, 0.4, 0.5, cond3, cfg, seed=2))
    assert "not permitted" in search.graph_stats.fallback_reason
    search.reset()  # forgets the failure: B = 2 tries again
    assert search.run(mean2, 0.4, 0.5, cond2, seed=2).graphed


@pytest.mark.float_order
@pytest.mark.parametrize("use", ["best", "sample", "mean"])
def test_row_offset_makes_results_independent_of_batching(use: str) -> None:
    """Five rollouts searched at once, or in batches each given its first rollout's index as
    row_offset (one seed for all): the same noise, elites and results per rollout."""
    model = AnalyticFlow(GRAPH_PROMPTS)
    reward = PreparedTargetReward(GRAPH_PROMPTS)
    mean = torch.randn((5, *SHAPE), generator=torch.Generator().manual_seed(6))
    scale = torch.linspace(0.3, 0.6, 5)
    cfg = SearchConfig(k=6, rounds=3, top=2, use=use, alpha=0.9)
    search = NoiseSearch(model, reward, cfg)
    whole = search.run(mean, scale, 0.6, model.encode_prompts(GRAPH_PROMPTS), seed=4)
    for bounds in ([0, 2, 5], [0, 1, 2, 3, 4, 5], [0, 4, 5]):
        parts = []
        for a, b in itertools.pairwise(bounds):
            cond = model.encode_prompts(GRAPH_PROMPTS[a:b])
            got = search.run(mean[a:b], scale[a:b], 0.6, cond, seed=4, row_offset=a)
            ref = search_reference(
                model, reward, mean[a:b], scale[a:b], 0.6, cond, cfg, seed=4, row_offset=a
            )
            assert_same(got, ref)
            parts.append(got)
        for f in ("eps", "mu", "sigma", "best_reward"):
            joined = torch.cat([getattr(r, f) for r in parts])
            assert_float_order_close(joined, getattr(whole, f), name=f"{f} of {bounds}")
        joined = torch.cat([r.rounds.best for r in parts], dim=1)
        assert_float_order_close(joined, whole.rounds.best, name=f"rounds.best of {bounds}")
    # without the offset, a batch draws the noise of rows 0.. instead: other results
    shifted = search.run(mean[2:], scale[2:], 0.6, model.encode_prompts(GRAPH_PROMPTS[2:]), seed=4)
    assert not torch.allclose(shifted.eps, whole.eps[2:])


@pytest.mark.parametrize("offset", [-1, True, 1.0, 2**32 - 1])
def test_row_offset_errors(offset) -> None:
    model, reward, cond, mean = setup(2)
    search = NoiseSearch(model, reward, SearchConfig(k=4, rounds=1, top=2))
    with pytest.raises(ValueError, match=r"row_offset: expected an int with 0 <= row_offset"):
        search.run(mean, 0.5, 0.5, cond, row_offset=offset)


def test_torch_noise_baseline() -> None:
    """The naive baseline (torch.randn noise) runs the same algorithm on other noise."""
    model, reward, cond, mean = setup(2)
    cfg = SearchConfig(k=4, rounds=2, top=2, use="sample")
    gen = torch.Generator().manual_seed(0)
    a = search_reference(model, reward, mean, 0.5, 0.5, cond, cfg, noise="torch", generator=gen)
    b = search_reference(model, reward, mean, 0.5, 0.5, cond, cfg)
    assert a.eps.shape == b.eps.shape and not torch.allclose(a.eps, b.eps)
    with pytest.raises(ValueError, match="noise: expected 'philox' or 'torch'"):
        search_reference(model, reward, mean, 0.5, 0.5, cond, cfg, noise="numpy")


@pytest.mark.cuda
def test_cuda_graph_round_matches_per_stage() -> None:
    """On a GPU: the embedded model's whole round captured once and replayed N times gives
    the per-stage result, and a second run reuses the warm-up."""
    from smartgrpo_fast import models, rewards

    model = models.load("tiny", device="cuda")
    reward = rewards.load("tiny", device="cuda")
    prompts = ["a red circle on a blue background", "a white cross on a black background"]
    cond = model.encode_prompts(prompts)
    mean = torch.randn((2, *model.latent_shape), device="cuda")
    cfg = SearchConfig(k=8, rounds=3, top=2, use="mean")
    graphed = NoiseSearch(model, reward, cfg).run(mean, 0.3, 0.8, cond, seed=4)
    staged = NoiseSearch(model, reward, SearchConfig(**{**cfg.__dict__, "graph": False}))
    want = staged.run(mean, 0.3, 0.8, cond, seed=4)
    assert graphed.graphed and not want.graphed
    assert_same(graphed, want, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("spec", ["tiny", "tiny:1,tiny-color:0.5"])
@pytest.mark.parametrize("per_element", [True, False], ids=["per_element", "pooled"])
def test_cuda_graph_is_captured_once_across_runs(spec: str, per_element: bool) -> None:
    """On a GPU: six run() calls with other prompts, rows and seeds capture one graph (the
    shipped rewards prepare their prompt tensors, the pooled sigma path captures) and each
    equals the per-stage search."""
    from dataclasses import replace

    from smartgrpo_fast import models, rewards
    from smartgrpo_fast.shapes import sample_prompts

    model = models.load("tiny", device="cuda")
    reward = rewards.reward_from_spec(spec, device="cuda")
    cfg = SearchConfig(k=8, rounds=3, top=2, use="mean", per_element=per_element)
    search = NoiseSearch(model, reward, cfg)
    staged = NoiseSearch(model, reward, replace(cfg, graph=False))
    prompts = sample_prompts(12, 0)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for i in range(6):
        cond = model.encode_prompts(prompts[2 * i : 2 * i + 2])
        mean = torch.randn((2, *model.latent_shape), device="cuda", generator=gen)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = search.run(mean, 0.3, 0.8, cond, seed=i)
        fallbacks = [str(w.message) for w in caught if "NoiseSearch" in str(w.message)]
        assert got.graphed and not fallbacks, fallbacks
        assert_same(got, staged.run(mean, 0.3, 0.8, cond, seed=i), atol=1e-4)
    stats = search.graph_stats
    assert (stats.captures, stats.recaptures, stats.eager_calls) == (1, 0, 0)
    assert stats.replays == 6 * cfg.rounds
