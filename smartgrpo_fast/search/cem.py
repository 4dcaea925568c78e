"""The Smart-GRPO noise search: N rounds of CEM over the noise of one SDE step.

One round for B rollouts (docs/design.md), all on the fused ops:

1. ``z = sample_perturb(mean, mu, sigma, scale, k=K)``         (B, K, *S), noise from Philox
2. ``v = model.velocity(z, t_next, cond, k=K)``                one batched forward of B*K rows
   (``preview_steps`` m > 1: m - 1 Euler steps toward t = 0 first, a forward each)
3. ``x0 = x0_estimate(z, v, t_next, scaling, shift)``          the clean estimate, un-scaled
   for the decoder that reads it (``models.base.preview_unscaling``)
4. ``r = reward(decode(x0), prompts)``                         (B, K); NaN/inf rank last;
   ``decode``: the model's preview decoder when it has one, else ``model.decode``
5. ``idx = topk_select(r, T)``; ``mu, sigma = cem_update(mu, sigma, idx, counts=...)``: a
   row updates from its finite elites only (``topk_select`` ranks them first; ``counts`` is
   how many there are, counted on the device), a row without any keeps mu and sigma

The noise never exists as a (B, K, D) tensor outside ``z``: ``cem_update`` regenerates the
elites' noise from (seed, round, row, candidate). Every piece of state the round reads or
writes — mu, sigma, the round counter, the seed, the best candidate so far and the statistics
— lives in a device tensor, so on CUDA one captured round replayed N times gives N distinct
rounds (``SearchConfig.graph``); elsewhere, or when capture fails, the same round function
runs stage by stage.

The captured round is kept and reused across :meth:`NoiseSearch.run` calls: one graph per
(B, K, latent shape, sigma shape, device, conditioning and prepared-prompt shapes). Each call
fills the graph's static tensors in place — the state, the conditioning (``cond``'s tensors)
and the reward's prepared prompt tensors (``reward.prepare``, made before the round, see
:mod:`smartgrpo_fast.rewards.base`) — and replays. A reward without ``prepare`` is called
with the prompt strings, which a graph cannot refill: its graph is captured again whenever
the prompts change. A failed capture sends that key to per-stage execution for good (one
warning per distinct reason); other keys still capture. Like
:class:`~smartgrpo_fast.graphs.GraphedCallable`, a graph reads the model's parameters at
replay time (in-place updates such as an optimizer step are seen); after re-creating
parameters call :meth:`NoiseSearch.reset`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from smartgrpo_fast.graphs import GraphStats, capture_graph, enclosing_graph, warm_up
from smartgrpo_fast.models.base import Cond, preview_decode, preview_unscaling
from smartgrpo_fast.ops import cem_update, sample_perturb, topk_select, x0_estimate
from smartgrpo_fast.rewards.base import (
    PreparedPrompts,
    Reward,
    prepare_prompts,
    score_prepared,
)
from smartgrpo_fast.search.config import RoundStats, SearchConfig, SearchResult

__all__ = ["NoiseSearch", "check_search_inputs", "finite_or_nan", "rescale_rows"]


@dataclass
class _State:
    """Every tensor one round reads or writes (static buffers when graphed)."""

    mean: torch.Tensor  # (B, *S) float32
    scale: torch.Tensor  # (B,) float32
    t: torch.Tensor  # (B*K,) float32, the flow time of z
    seed: torch.Tensor  # 0-d int64
    round: torch.Tensor  # 0-d int64
    row_offset: torch.Tensor  # 0-d int64: row b draws the Philox stream's row b + row_offset
    mu: torch.Tensor  # (B, *S) float32
    sigma: torch.Tensor  # (B, *S) or (B,) float32
    best_reward: torch.Tensor  # (B,) float32, -inf until a finite reward was seen
    best_eps: torch.Tensor  # (B, *S) float32
    best_v: torch.Tensor  # (B, *S) float32, the velocity at best_eps's candidate (keeps_velocity)
    stats: torch.Tensor  # (4, N, B) float32: best, elite mean, mean, non-finite count

    def clone(self) -> _State:
        return _State(**{f.name: getattr(self, f.name).clone() for f in fields(self)})

    def load(self, other: _State) -> None:
        for f in fields(self):
            getattr(self, f.name).copy_(getattr(other, f.name))


@dataclass
class _Lookahead:
    """The last point of a round's lookahead: latents z at flow times t (B*K,), velocity v;
    ``v0``: the velocity of the first forward, at the candidates themselves."""

    z: torch.Tensor
    v: torch.Tensor
    t: torch.Tensor
    v0: torch.Tensor


@dataclass
class _Graph:
    """One captured round and the static tensors it reads and writes."""

    state: _State
    cond: Cond  # static copies of the conditioning's tensors
    prepared: PreparedPrompts  # static copies of the reward's prepared tensors
    replay: Callable[[], None]
    prompts: tuple[str, ...] | None  # the prompts baked in (reward without prepare), or None


def _cond_tensors(cond: Cond) -> dict[str, torch.Tensor]:
    return {f.name: v for f in fields(cond) if isinstance(v := getattr(cond, f.name), torch.Tensor)}


def _cond_signature(cond: Cond) -> tuple:
    return tuple(
        (f.name, None if v is None else (tuple(v.shape), v.dtype, v.device))
        for f in fields(cond)
        if isinstance(v := getattr(cond, f.name), torch.Tensor) or v is None
    )


def _static_copy(cond: Cond, prepared: PreparedPrompts) -> tuple[Cond, PreparedPrompts]:
    """Fresh buffers holding copies of cond's tensors and of the prepared tensors."""
    static_cond = replace(cond, **{k: v.clone() for k, v in _cond_tensors(cond).items()})
    return static_cond, prepared.with_tensors({k: v.clone() for k, v in prepared.tensors.items()})


def finite_or_nan(r: torch.Tensor) -> torch.Tensor:
    """``r`` with every inf turned into NaN, so that it ranks last and is counted."""
    return torch.where(torch.isfinite(r), r, torch.full_like(r, float("nan")))


def rescale_rows(eps: torch.Tensor) -> torch.Tensor:
    """Each row of eps (B, *S) scaled to norm sqrt(D); an all-zero row stays zero."""
    flat = eps.flatten(1)
    norm = flat.norm(dim=1, keepdim=True)
    factor = torch.where(norm > 0, math.sqrt(flat.shape[1]) / norm.clamp_min(1e-30), 0.0)
    return (flat * factor).view_as(eps)


def check_search_inputs(
    model: Any, mean: object, scale: object, t_next: object, cond: object
) -> tuple[torch.Tensor, torch.Tensor, float, list[str]]:
    """Validate one search's inputs; return (mean float32, scale (B,) float32, t, prompts)."""
    if not isinstance(mean, torch.Tensor) or not mean.dtype.is_floating_point:
        raise TypeError(f"mean: expected a float tensor (B, C, H, W), got {type(mean).__name__}")
    shape = tuple(getattr(model, "latent_shape", mean.shape[1:]))
    if mean.dim() != 1 + len(shape) or tuple(mean.shape[1:]) != shape or mean.shape[0] < 1:
        raise ValueError(
            f"mean: expected (B, {', '.join(map(str, shape))}) with B >= 1, "
            f"got shape {tuple(mean.shape)}"
        )
    b = mean.shape[0]
    if not bool(torch.isfinite(mean).all()):
        raise ValueError(f"mean: {int((~torch.isfinite(mean)).sum())} non-finite values")
    if isinstance(scale, torch.Tensor):
        if scale.dim() == 0:
            scale = scale.reshape(1).expand(b)
        if scale.shape != (b,):
            raise ValueError(
                f"scale: expected a float or a ({b},) tensor, got {tuple(scale.shape)}"
            )
        if scale.device != mean.device:
            raise ValueError(f"scale: expected device {mean.device}, got {scale.device}")
        scale_t = scale.float()
    elif isinstance(scale, (int, float)) and not isinstance(scale, bool):
        scale_t = torch.full((b,), float(scale), device=mean.device)
    else:
        raise TypeError(f"scale: expected a float or a ({b},) tensor, got {type(scale).__name__}")
    if not bool((torch.isfinite(scale_t) & (scale_t >= 0)).all()):
        raise ValueError(f"scale: expected finite values >= 0, got {scale_t.tolist()}")
    if isinstance(t_next, torch.Tensor):
        if t_next.numel() != 1:
            raise ValueError(
                f"t_next: expected a float, got a tensor of shape {tuple(t_next.shape)}"
            )
        t_next = float(t_next)
    if isinstance(t_next, bool) or not isinstance(t_next, (int, float)) or not 0 <= t_next <= 1:
        raise ValueError(f"t_next: expected a flow time in [0, 1], got {t_next!r}")
    if not isinstance(cond, Cond):
        raise TypeError(f"cond: expected a Cond (model.encode_prompts), got {type(cond).__name__}")
    if cond.batch != b:
        raise ValueError(f"cond: expected B = {b} prompts (mean has {b} rows), got {cond.batch}")
    if len(cond.prompts) != b:
        raise ValueError("cond: the reward needs the prompt strings; encode with encode_prompts")
    return mean.float(), scale_t, float(t_next), list(cond.prompts)


def _graph_capable(device: torch.device) -> bool:
    return device.type == "cuda"


def _capture_round(round_fn: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """Capture one call of ``round_fn`` as a CUDA graph; return its replay (which re-runs the
    round on the same tensors ``round_fn`` read and wrote when captured)."""
    graph, _ = capture_graph(round_fn)
    return graph.replay


class NoiseSearch:
    """Search the noise of one Flow-GRPO SDE step for B rollouts at once (module docstring).

    Args:
        model: a FlowModel (``velocity``, ``decode``, ``latent_shape``; ``scaling_factor`` and
            ``shift_factor`` when its latents are VAE-scaled, default 1 and 0).
        reward: a Reward, called once per round on B*K images.
        config: the search's constants (:class:`SearchConfig`).

    Example::

        step = sde_step(x, v, sigma, sigma_next, noise_level=0.7)
        res = NoiseSearch(model, reward, SearchConfig(k=16, rounds=3, top=4)).run(
            step.mean, step.std, sigma_next, cond, seed=step_seed)
        x_next = step.mean + step.std * res.eps
    """

    def __init__(self, model: Any, reward: Reward, config: SearchConfig | None = None) -> None:
        if not callable(getattr(model, "velocity", None)) or not callable(
            getattr(model, "decode", None)
        ):
            raise TypeError(f"model: expected a FlowModel, got {type(model).__name__}")
        if not callable(reward):
            raise TypeError(f"reward: expected a callable Reward, got {type(reward).__name__}")
        self.model = model
        self.reward = reward
        self.config = config or SearchConfig()
        #: captures (new graphs), recaptures (a reward without ``prepare`` saw new prompts),
        #: replays (rounds run from a graph), eager_calls (rounds run stage by stage) and the
        #: latest fallback_reason.
        self.graph_stats = GraphStats()
        self._graphs: dict[tuple, _Graph] = {}
        self._graph_failures: dict[tuple, str] = {}
        self._warned: set[str] = set()

    def reset(self) -> None:
        """Drop every captured round and remembered capture failure (after the model's or the
        reward's parameters were re-created rather than updated in place)."""
        self._graphs.clear()
        self._graph_failures.clear()

    # ------------------------------------------------------------------ the round

    def _round(self, st: _State, cond: Cond, prepared: PreparedPrompts) -> None:
        """One CEM round on ``st``, in place; reads the round number from ``st.round`` and the
        prompts only through ``cond``'s and ``prepared``'s tensors (graph-safe rewards). The
        stages are the methods below (``bench search`` times them one by one)."""
        z = self._sample(st)
        ahead = self._forward(st, z, cond)
        x0 = self._x0(st, ahead)
        r = self._score(st, self._decode(x0), prepared)
        self._select_update(st, r, ahead.v0)

    def _sample(self, st: _State) -> torch.Tensor:
        """(B*K, *S) candidates ``z`` of this round (fused sample + perturb, Philox noise)."""
        b, k = st.mean.shape[0], self.config.k
        return sample_perturb(
            st.mean, st.mu, st.sigma, st.scale, k=k, seed=st.seed, round=st.round,
            row_offset=st.row_offset, validate=False,
        ).view(b * k, *st.mean.shape[1:])  # fmt: skip

    def _forward(self, st: _State, z: torch.Tensor, cond: Cond) -> _Lookahead:
        """The velocity at the candidates (one batched forward of B*K rows), after
        ``preview_steps - 1`` Euler steps toward t = 0 when m > 1 (one forward each)."""
        m, k = self.config.preview_steps, self.config.k
        x, t = z, st.t
        v = v0 = self.model.velocity(x, t, cond, k=k)
        for i in range(1, m):
            t_next = st.t * (1.0 - i / m)  # uniform in t from t to 0
            x = x0_estimate(x, v, t - t_next, validate=False)  # x + (t_next - t) v
            t = t_next
            v = self.model.velocity(x, t, cond, k=k)
        return _Lookahead(x, v, t, v0)

    def _x0(self, st: _State, ahead: _Lookahead) -> torch.Tensor:
        """(B*K, *S) clean estimates (the last Euler step to t = 0), in the scale of the
        decoder that reads them (the preview decoder's when the model has one:
        ``models.base.preview_unscaling``)."""
        scaling, shift = preview_unscaling(self.model)
        return x0_estimate(ahead.z, ahead.v, ahead.t, scaling=scaling, shift=shift,
                           validate=False)  # fmt: skip

    def _decode(self, x0: torch.Tensor) -> torch.Tensor:
        """(B*K, 3, H, W) images in [0, 1] (resized to ``decode_size`` when set), through the
        model's preview decoder when it has one (``models.base.preview_decode``)."""
        return preview_decode(self.model, x0, self.config.decode_size)

    def _score(self, st: _State, images: torch.Tensor, prepared: PreparedPrompts) -> torch.Tensor:
        """(B, K) float32 rewards of the candidates; inf turned into NaN (ranks last)."""
        b, k = st.mean.shape[0], self.config.k
        r = score_prepared(self.reward, images, prepared)
        if not isinstance(r, torch.Tensor) or r.shape != (b * k,):
            raise ValueError(
                f"reward: expected a ({b * k},) tensor for {b * k} images, got "
                f"{tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__}"
            )
        return finite_or_nan(r.to(st.mean.device, torch.float32).view(b, k))

    def _select_update(self, st: _State, r: torch.Tensor, v0: torch.Tensor | None = None) -> None:
        """Elites, the best candidate so far (and its velocity ``v0``, (B*K, *S), when the
        config keeps it), the round's statistics and the CEM update."""
        cfg = self.config
        b, s = st.mean.shape[0], tuple(st.mean.shape[1:])
        idx = topk_select(r, cfg.top, validate=False)
        common = {"shape": st.mean.shape, "k": cfg.k, "seed": st.seed, "round": st.round}
        common |= {"row_offset": st.row_offset, "per_element": cfg.per_element, "validate": False}
        # The best candidate's noise: the mean of a single "elite" with alpha = 1 is that eps,
        # regenerated from Philox like every elite (no (B, K, D) buffer).
        eps1, _ = cem_update(st.mu, st.sigma, idx[:, :1], alpha=1.0, min_sigma=0.0, **common)
        r1 = r.gather(1, idx[:, :1]).squeeze(1)
        better = r1 > st.best_reward  # NaN compares False
        st.best_reward.copy_(torch.where(better, r1, st.best_reward))
        st.best_eps.copy_(torch.where(better.view(b, *([1] * len(s))), eps1, st.best_eps))
        if v0 is not None and cfg.keeps_velocity:
            flat = v0.reshape(b, cfg.k, -1)
            v1 = flat.gather(1, idx[:, :1, None].expand(b, 1, flat.shape[2])).view(b, *s)
            st.best_v.copy_(torch.where(better.view(b, *([1] * len(s))), v1.float(), st.best_v))
        r_elite = r.gather(1, idx)
        row = torch.stack([r1, r_elite.mean(1), r.nanmean(1), torch.isnan(r).sum(1).float()])
        st.stats.index_copy_(1, st.round.view(1), row.unsqueeze(1))
        if cfg.strategy == "cem":
            # NaN ranks last: the finite elites come first, and only they update the row (no
            # host sync: the count stays on the device, a captured round reads it there)
            counts = torch.isfinite(r_elite).sum(1)
            mu, sigma = cem_update(
                st.mu, st.sigma, idx, alpha=cfg.alpha, min_sigma=cfg.min_sigma, counts=counts,
                **common,
            )  # fmt: skip
            st.mu.copy_(mu)
            st.sigma.copy_(sigma)
        st.round.add_(1)

    # ------------------------------------------------------------------ running

    def _initial_state(
        self, mean: torch.Tensor, scale: torch.Tensor, t_next: float, seed: int, row_offset: int = 0
    ) -> _State:
        cfg = self.config
        b, dev = mean.shape[0], mean.device
        sigma_shape = mean.shape if cfg.per_element else (b,)
        return _State(
            mean=mean.contiguous(),
            scale=scale.contiguous(),
            t=torch.full((b * cfg.k,), t_next, device=dev),
            seed=torch.tensor(seed, dtype=torch.int64, device=dev),
            round=torch.zeros((), dtype=torch.int64, device=dev),
            row_offset=torch.tensor(row_offset, dtype=torch.int64, device=dev),
            mu=torch.full(mean.shape, cfg.mu0, device=dev),
            sigma=torch.full(sigma_shape, cfg.sigma0, device=dev),
            best_reward=torch.full((b,), float("-inf"), device=dev),
            best_eps=torch.full(mean.shape, cfg.mu0, device=dev),
            best_v=torch.zeros(mean.shape, device=dev),
            stats=torch.full((4, cfg.rounds, b), float("nan"), device=dev),
        )

    def _graph_key(self, st: _State, cond: Cond, prepared: PreparedPrompts) -> tuple:
        """What a captured round is specialised to (everything else is refilled per call)."""
        return (
            tuple(st.mean.shape),
            tuple(st.sigma.shape),
            st.mean.device,
            self.config,
            _cond_signature(cond),
            prepared.signature(),
        )

    def _graph_for(self, init: _State, cond: Cond, prepared: PreparedPrompts) -> _Graph | None:
        """The captured round for these inputs (capturing it on first use), or None: not on
        CUDA, graphs off, or its capture failed (warned once per distinct reason)."""
        dev = init.mean.device
        if not (self.config.graph and _graph_capable(dev)):
            return None
        key = self._graph_key(init, cond, prepared)
        if key in self._graph_failures:
            self.graph_stats.fallback_reason = self._graph_failures[key]
            return None
        baked = None if prepared.complete else prepared.prompts
        g = self._graphs.get(key)
        if g is not None and g.prompts != baked:
            del self._graphs[key]  # the reward reads prompt strings: capture for the new ones
            self.graph_stats.recaptures += 1
            g = None
        if g is not None:
            return g
        try:
            g = self._capture(init, cond, prepared, baked)
        except Exception as exc:  # capture fails in many ways (syncs, CPU work): go per stage
            reason = f"CUDA graph capture failed ({type(exc).__name__}: {exc})"
            self._graph_failures[key] = reason
            self.graph_stats.fallback_reason = reason
            if reason not in self._warned:
                self._warned.add(reason)
                warnings.warn(
                    f"NoiseSearch: running rounds stage by stage for B={init.mean.shape[0]}, "
                    f"K={self.config.k}, latent {tuple(init.mean.shape[1:])}: {reason}",
                    RuntimeWarning,
                    stacklevel=4,
                )
            return None
        self._graphs[key] = g
        self.graph_stats.captures += 1
        return g

    def _capture(
        self,
        init: _State,
        cond: Cond,
        prepared: PreparedPrompts,
        baked: tuple[str, ...] | None,
    ) -> _Graph:
        """Static buffers, one warm-up round (Triton JIT, cuBLAS handles, reward caches), one
        capture; the buffers are left holding ``init``."""
        st = init.clone()
        static_cond, static_prepared = _static_copy(cond, prepared)

        def round_fn() -> None:
            self._round(st, static_cond, static_prepared)

        dev = st.mean.device
        # the model's forward (its configured backend) and the rest run without graphs of
        # their own, in the warm-up as in the capture: compile backends compile once here
        with enclosing_graph():
            warm_up(round_fn, dev)
            st.load(init)
            replay = _capture_round(round_fn, dev)
        st.load(init)
        return _Graph(st, static_cond, static_prepared, replay, baked)

    @staticmethod
    def _fill(g: _Graph, init: _State, cond: Cond, prepared: PreparedPrompts) -> None:
        """Copy this call's inputs into the graph's static tensors."""
        g.state.load(init)
        static = _cond_tensors(g.cond)
        for name, value in _cond_tensors(cond).items():
            static[name].copy_(value)
        for name, value in prepared.tensors.items():
            g.prepared.tensors[name].copy_(value)

    @torch.no_grad()
    def run(
        self,
        mean: torch.Tensor,
        scale: float | torch.Tensor,
        t_next: float,
        cond: Cond,
        *,
        seed: int | None = None,
        row_offset: int = 0,
        progress: bool = False,
    ) -> SearchResult:
        """Search the noise of one SDE step for B rollouts.

        Args:
            mean: (B, C, H, W) float, the SDE step's mean (:func:`smartgrpo_fast.sde.sde_step`).
            scale: the step's noise scale ``std_t * sqrt(-dt)``: a float or a (B,) tensor.
            t_next: the flow time the step lands on (the candidates' ``z`` live there).
            cond: the conditioning of the B rollouts' prompts (with their strings).
            seed: overrides ``config.seed`` for this call (use one per searched step).
            row_offset: the rollouts' global index of row 0: row b draws the noise of row
                ``b + row_offset`` of the (seed, round) stream, so a set of rollouts searched in
                batches of any size draws the same noise per rollout as searched at once (give
                each batch its first rollout's index and one seed for all).
            progress: show a progress bar over the rounds.

        Returns:
            :class:`SearchResult` (its tensors are the caller's: a later call does not
            overwrite them); the rollout continues at ``mean + scale * result.eps``.
        """
        cfg = self.config
        mean_f, scale_t, t, prompts = check_search_inputs(self.model, mean, scale, t_next, cond)
        seed = cfg.seed if seed is None else seed
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"seed: expected an int in [0, 2**63), got {seed!r}")
        b = mean_f.shape[0]
        if (
            isinstance(row_offset, bool)
            or not isinstance(row_offset, int)
            or not 0 <= row_offset <= 2**32 - b
        ):
            raise ValueError(
                f"row_offset: expected an int with 0 <= row_offset and row_offset + B <= 2**32 "
                f"(B = {b}), got {row_offset!r}"
            )
        init = self._initial_state(mean_f, scale_t, t, seed, row_offset)
        prepared = prepare_prompts(
            self.reward, [p for p in prompts for _ in range(cfg.k)], mean_f.device
        )
        g = self._graph_for(init, cond, prepared)
        if g is not None:
            self._fill(g, init, cond, prepared)
            st, step = g.state, g.replay
        else:
            st = init

            def step() -> None:
                self._round(st, cond, prepared)

        rounds = range(cfg.rounds)
        if progress:
            from tqdm.auto import tqdm

            rounds = tqdm(rounds, desc=f"search K={cfg.k}", unit="round", leave=False)
        for _ in rounds:
            step()
        if g is not None:
            self.graph_stats.replays += cfg.rounds
        else:
            self.graph_stats.eager_calls += cfg.rounds
        return self._result(st, g is not None)

    def _result(self, st: _State, graphed: bool) -> SearchResult:
        cfg = self.config
        found = torch.isfinite(st.best_reward)
        if cfg.strategy == "best_of" or cfg.use == "best":
            keep = found.view(-1, *([1] * (st.mean.dim() - 1)))
            eps = torch.where(keep, st.best_eps, st.mu)  # no finite reward at all: the mean
        elif cfg.use == "mean":
            eps = st.mu.clone()
        else:  # a draw from the final N(mu, sigma^2), on Philox round N
            eps = sample_perturb(
                torch.zeros_like(st.mean), st.mu, st.sigma, 1.0,
                k=1, seed=st.seed, round=cfg.rounds, row_offset=st.row_offset, validate=False,
            ).squeeze(1)  # fmt: skip
        if cfg.rescale:
            eps = rescale_rows(eps)
        best = torch.where(found, st.best_reward, torch.full_like(st.best_reward, float("nan")))
        stats = st.stats.clone() if graphed else st.stats  # graphed: static, refilled next call
        stats = RoundStats(stats[0], stats[1], stats[2], stats[3].long())
        velocity = None
        if cfg.keeps_velocity:
            velocity = st.best_v.clone() if graphed else st.best_v
        return SearchResult(
            eps=eps,
            mu=st.mu.clone() if graphed else st.mu,
            sigma=st.sigma.clone() if graphed else st.sigma,
            best_reward=best,
            rounds=stats,
            candidates=cfg.model_calls,
            graphed=graphed,
            velocity=velocity,
        )
