"""The noise search's configuration and result types."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["STRATEGIES", "USES", "RoundStats", "SearchConfig", "SearchResult"]

USES = ("mean", "sample", "best")
STRATEGIES = ("cem", "best_of")


@dataclass(frozen=True)
class SearchConfig:
    """How :class:`~smartgrpo_fast.search.NoiseSearch` searches the noise of one SDE step.

    Attributes:
        k: candidates per round and rollout (K). 16: one batched forward of B*16 rows keeps a GPU
            busy at B >= 4, and 16 draws give the top-4 elites a usable spread.
        rounds: CEM rounds (N). 3: the model calls per searched step are K*N = 48; on the
            embedded model most of the gain came in the first two rounds.
        top: elites kept per round (T), 1 <= T <= K. 4 = K/4, the usual CEM elite fraction.
            Non-finite rewards never make elites: a rollout with fewer than T finite rewards
            in a round updates mu and sigma from those it has, one with none keeps them.
        mu0: initial noise mean; 0 = the policy's own N(0, I), so round 1 is an unbiased draw.
        sigma0: initial noise std, > 0; 1 for the same reason.
        alpha: smoothing in (0, 1] of the mean/std update; 1 is textbook CEM (docs/design.md).
        min_sigma: floor of the refined std, >= 0. 0 = textbook; raise it to keep exploring.
        per_element: one std per latent element (True) or one pooled std per rollout (False).
        use: which noise the rollout takes: ``"mean"`` (the final CEM mean, docs/design.md's
            reading), ``"sample"`` (a draw from the final N(mu, sigma^2)) or ``"best"`` (the
            highest-reward candidate evaluated in any round). Default ``"best"``: on two
            earlier weights of the embedded model (benchmarks/RESULTS.md, "Choosing the
            defaults") it matched or beat ``"mean"`` in 3 of 4 paired runs and ``"sample"``
            in every one; not yet re-measured on the shipped weights.
        rescale: rescale the chosen noise of each rollout to norm ``sqrt(D)`` (the norm a
            standard normal draw of D elements has on average), so the step injects as much
            noise as the policy's Gaussian assumes.
        strategy: ``"cem"`` or ``"best_of"``: the best-of-M baseline at equal model calls
            (M = K*N draws from N(mu0, sigma0^2), N rounds of K, no refinement, ``use`` is
            ignored and the best candidate is taken).
        seed: Philox key of the search's noise; a rollout's noise is keyed by (seed, round,
            row, candidate), so give each searched step its own seed (``NoiseSearch.run(...,
            seed=)``) and each batch of rollouts its global row index
            (``NoiseSearch.run(..., row_offset=)``), so that batching does not change results.
        decode_size: resize decoded images to this size before the reward (None: the
            decoder's own size; rewards resize to their input size themselves).
        graph: on CUDA, capture one whole round (sample_perturb, velocity, x0_estimate,
            decode, reward, topk_select, cem_update) as a CUDA graph and replay it N times;
            falls back to per-stage execution, with one warning, when capture fails.
        preview_steps: m, the Euler steps from the candidates' flow time t to 0 that make the
            clean estimate a candidate is scored on (a lookahead preview). 1 (default) is the
            one-step ``z - t v``; m > 1 steps on the uniform times ``t (1 - i / m)``,
            i = 0..m-1, costing m velocity rows per candidate (:attr:`forward_rows`).
    """

    k: int = 16
    rounds: int = 3
    top: int = 4
    mu0: float = 0.0
    sigma0: float = 1.0
    alpha: float = 1.0
    min_sigma: float = 0.0
    per_element: bool = True
    use: str = "best"
    rescale: bool = False
    strategy: str = "cem"
    seed: int = 0
    decode_size: int | None = None
    graph: bool = True
    preview_steps: int = 1

    def __post_init__(self) -> None:
        for name in ("k", "rounds", "top", "preview_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        if self.top > self.k:
            raise ValueError(f"top: expected 1 <= top <= k = {self.k}, got {self.top}")
        if not math.isfinite(self.mu0):
            raise ValueError(f"mu0: expected a finite float, got {self.mu0}")
        if not (math.isfinite(self.sigma0) and self.sigma0 > 0):
            raise ValueError(f"sigma0: expected a finite float > 0, got {self.sigma0}")
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha: expected 0 < alpha <= 1, got {self.alpha}")
        if not (math.isfinite(self.min_sigma) and self.min_sigma >= 0):
            raise ValueError(f"min_sigma: expected a finite float >= 0, got {self.min_sigma}")
        if self.use not in USES:
            raise ValueError(f"use: expected one of {', '.join(USES)}, got {self.use!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"strategy: expected one of {', '.join(STRATEGIES)}, got {self.strategy!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed: expected an int, got {type(self.seed).__name__}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed: expected 0 <= seed < 2**63, got {self.seed}")
        if self.decode_size is not None and self.decode_size < 1:
            raise ValueError(f"decode_size: expected None or an int >= 1, got {self.decode_size}")

    @property
    def model_calls(self) -> int:
        """Candidates evaluated per rollout: K * N (one reward and one preview decode each)."""
        return self.k * self.rounds

    @property
    def keeps_velocity(self) -> bool:
        """Whether the chosen noise is a candidate whose velocity the search computed (``use``
        ``best`` or ``strategy`` ``best_of``, without ``rescale``): then the search keeps
        that velocity and returns it (:attr:`SearchResult.velocity`)."""
        return (self.use == "best" or self.strategy == "best_of") and not self.rescale

    @property
    def forward_rows(self) -> int:
        """Velocity rows per rollout: preview_steps * K * N (m forwards per candidate)."""
        return self.preview_steps * self.k * self.rounds


@dataclass(frozen=True)
class RoundStats:
    """Reward statistics of every round, each (N, B): rounds x rollouts, float32 on the search's
    device (``nan_count`` int64). Non-finite rewards are left out of the means and counted.

    Attributes:
        best: the highest finite reward of the round (NaN when none was finite).
        elite_mean: mean reward of the round's T elites (NaN when any elite was non-finite).
        mean: mean finite reward of the round's K candidates (the population mean).
        nan_count: how many of the K rewards were NaN or inf.
    """

    best: torch.Tensor
    elite_mean: torch.Tensor
    mean: torch.Tensor
    nan_count: torch.Tensor

    def as_dict(self) -> list[dict[str, list[float] | list[int]]]:
        """One JSON-ready dict per round (lists over the B rollouts)."""
        return [
            {
                "best": self.best[i].tolist(),
                "elite_mean": self.elite_mean[i].tolist(),
                "mean": self.mean[i].tolist(),
                "nan_count": self.nan_count[i].tolist(),
            }
            for i in range(self.best.shape[0])
        ]


@dataclass(frozen=True)
class SearchResult:
    """What one search returns.

    Attributes:
        eps: (B, *S) float32, the chosen noise per rollout (``x_next = mean + scale * eps``).
        mu: (B, *S) float32, the final CEM mean (mu0 everywhere for ``best_of``).
        sigma: (B, *S) float32 per element, or (B,) pooled: the final CEM std.
        best_reward: (B,) float32, the highest finite reward evaluated (NaN when none).
        rounds: per-round statistics.
        candidates: candidates evaluated per rollout (K * N).
        graphed: True when the rounds ran as replays of one captured CUDA graph.
        velocity: (B, *S) float32, the model's velocity at ``mean + scale * eps`` and
            ``t_next`` as the search's forward computed it (in its batch of B*K rows), when
            ``eps`` is a candidate the search evaluated (:attr:`SearchConfig.keeps_velocity`),
            else None; valid in the rows whose ``best_reward`` is finite (a row that saw no
            finite reward takes ``mu``, never evaluated: its velocity row is 0). A rollout's
            next step can take it instead of a forward of its own.
    """

    eps: torch.Tensor
    mu: torch.Tensor
    sigma: torch.Tensor
    best_reward: torch.Tensor
    rounds: RoundStats
    candidates: int
    graphed: bool = False
    velocity: torch.Tensor | None = None
