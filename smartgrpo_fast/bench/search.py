"""Benchmark of one whole noise search: candidates per second, fused vs naive.

One call = one search of B rollouts (K candidates, N rounds, T elites) at one SDE step, the
unit of work Smart-GRPO adds per searched step. Providers:

* ``reference``: :func:`smartgrpo_fast.search.search_reference` with ``noise="torch"`` — the
  naive implementation (materialised ``torch.randn`` noise, unfused arithmetic, a Python loop);
* ``fused``: :class:`smartgrpo_fast.search.NoiseSearch` stage by stage (fused ops: Triton on
  CUDA, the C++ ops on CPU);
* ``graph``: NoiseSearch with one captured round replayed N times (CUDA only).

Models: ``tiny`` (the embedded pixel-space model, prompt-matching reward ``tiny``),
``sd3-tiny`` (the tiny random SD3 pipeline: VAE decode, latents (16, 32, 32)) and
``sd35-medium`` (SD3.5-medium's transformer and the SD3 VAE with random weights at 512 px;
build on a GPU). The SD3 models use random conditioning and the analytic ``tiny-color``
reward on the decoded images, so the timing is the search's own, not a reward model's.
Rows use the ops benchmark's CSV schema (op ``search``, x = B*K*N candidates per call),
plus ``throughput`` rows (candidates/s) and ``speedup`` rows (reference / provider).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from smartgrpo_fast.bench.ops import (
    DTYPES,
    CaseShape,
    OpCase,
    collect_run_info,
    measure,
    measurement_rows,
    parse_device,
    ratio_row,
)
from smartgrpo_fast.search import NoiseSearch, SearchConfig, search_reference

__all__ = ["MODELS", "PROVIDERS", "SearchBenchConfig", "format_search_table", "run"]

MODELS = ("tiny", "sd3-tiny", "sd35-medium")
PROVIDERS = ("reference", "fused", "graph")
_PROMPT = "a red circle on a blue background"


@dataclass(frozen=True)
class SearchBenchConfig:
    """What the search benchmark runs (see the module docstring).

    Attributes:
        model: one of :data:`MODELS`.
        providers: from :data:`PROVIDERS` (``graph`` needs CUDA).
        batch: rollouts per search (B).
        k, rounds, top: the search's K, N and T.
        dtype: model dtype; device: ``cpu`` or ``cuda[:N]``.
        repeats, warmup: timed and untimed searches.
    """

    model: str = "tiny"
    providers: tuple[str, ...] = ("reference", "fused")
    batch: int = 4
    k: int = 16
    rounds: int = 3
    top: int = 4
    dtype: str = "float32"
    device: str = "cpu"
    repeats: int = 5
    warmup: int = 1

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model: expected one of {', '.join(MODELS)}, got {self.model!r}")
        for p in self.providers:
            if p not in PROVIDERS:
                raise ValueError(
                    f"providers: expected names from {', '.join(PROVIDERS)}, got {p!r}"
                )
        if "graph" in self.providers and parse_device(self.device).type != "cuda":
            raise ValueError("providers: graph needs a CUDA device")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        SearchConfig(k=self.k, rounds=self.rounds, top=self.top)  # validates K, N, T
        if self.batch < 1 or self.repeats < 1 or self.warmup < 0:
            raise ValueError("batch, repeats: expected >= 1; warmup: expected >= 0")


def _model_and_cond(config: SearchBenchConfig) -> tuple[Any, Any, Any]:
    """(model, reward, cond) for ``config.model``."""
    from smartgrpo_fast import models, rewards

    dtype, device = DTYPES[config.dtype], parse_device(config.device)
    prompts = [_PROMPT] * config.batch
    if config.model == "tiny":
        model = models.load("tiny", device=device, dtype=dtype)
        return model, rewards.load("tiny", device=device), model.encode_prompts(prompts)
    from smartgrpo_fast.bench.velocity import VelocityBenchConfig, build_velocity_model, random_cond

    name = "tiny" if config.model == "sd3-tiny" else "sd35-medium"
    vcfg = VelocityBenchConfig(model=name, dtype=config.dtype, device=config.device)
    model = build_velocity_model(vcfg, "eager")
    cond = random_cond(model, config.batch, prompts=tuple(prompts))
    return model, rewards.load("tiny-color"), cond


def run(config: SearchBenchConfig) -> list[dict]:
    """Time one search per provider; rows as described in the module docstring."""
    device = parse_device(config.device)
    info = collect_run_info(device)
    model, reward, cond = _model_and_cond(config)
    search = SearchConfig(k=config.k, rounds=config.rounds, top=config.top, graph=False)
    gen = torch.Generator(device=device).manual_seed(1)
    mean = torch.randn((config.batch, *model.latent_shape), generator=gen, device=device)
    scale, t_next = 0.3, 0.8
    fused = NoiseSearch(model, reward, search)
    graphed = NoiseSearch(model, reward, replace(search, graph=True))
    torch_gen = torch.Generator().manual_seed(2)
    calls = {
        "reference": lambda: search_reference(model, reward, mean, scale, t_next, cond, search,
                                              noise="torch", generator=torch_gen),
        "fused": lambda: fused.run(mean, scale, t_next, cond),
        "graph": lambda: graphed.run(mean, scale, t_next, cond),
    }  # fmt: skip
    candidates = config.batch * config.k * config.rounds
    shape = CaseShape(batch=config.batch, k=config.k, latent=tuple(model.latent_shape),
                      elites=config.top)  # fmt: skip
    rows: list[dict] = []
    for provider in config.providers:
        case = OpCase("search", provider, shape, model.dtype, device, calls[provider], 0)
        timing = measure(calls[provider], device, warmup=config.warmup, repeats=config.repeats)
        time_row = next(r for r in measurement_rows(case, timing, info, config.repeats)
                        if r["metric"] == "time")  # fmt: skip
        time_row |= {"x_name": "candidates", "x": candidates}
        rows.append(time_row)
        rows.append(
            {**time_row, "metric": "throughput", "unit": "candidates/s",
             "median": candidates / (timing.median * 1e-3),
             "p20": candidates / (timing.p80 * 1e-3), "p80": candidates / (timing.p20 * 1e-3)}
        )  # fmt: skip
    base = next((r for r in rows if r["provider"] == "reference" and r["metric"] == "time"), None)
    if base is not None:
        for r in [r for r in rows if r["metric"] == "time" and r["provider"] != "reference"]:
            rows.append(ratio_row(r, base, "reference/provider"))
    return rows


def format_search_table(rows: list[dict]) -> str:
    """One line per provider: ms per search, candidates/s, speed-up over the reference."""
    speed = {r["provider"]: r["median"] for r in rows if r["metric"] == "speedup"}
    lines = [f"{'provider':<10} {'candidates':>10} {'ms/search':>10} {'cand/s':>10} {'vs ref':>8}"]
    for r in rows:
        if r["metric"] != "time":
            continue
        s = speed.get(r["provider"])
        lines.append(
            f"{r['provider']:<10} {r['x']:>10} {r['median']:>10.1f} "
            f"{1e3 * r['x'] / r['median']:>10.1f} {'-' if s is None else f'{s:.2f}x':>8}"
        )
    return "\n".join(lines)
