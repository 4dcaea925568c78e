"""Benchmark of one whole noise search: candidates per second, fused vs naive, split by stage.

One call = one search of B rollouts (K candidates, N rounds, T elites) at one SDE step, the
unit of work Smart-GRPO adds per searched step. Providers:

* ``reference``: :func:`smartgrpo_fast.search.search_reference` with ``noise="torch"`` — the
  naive implementation (materialised ``torch.randn`` noise drawn on the model's device from a
  device generator, as ``bench ops`` draws it; unfused arithmetic, a Python loop);
* ``fused``: :class:`smartgrpo_fast.search.NoiseSearch` stage by stage (fused ops: Triton on
  CUDA, the C++ ops on CPU);
* ``graph``: NoiseSearch with one captured round replayed N times (CUDA only);
* variants ``fused+OPT...`` / ``graph+OPT...`` (SD3 models), options in any order:
  ``preview`` (the search's estimates decoded by a preview decoder, :data:`PREVIEW_RANDOM`:
  TAESD3's layout with random weights, or an ``AutoencoderTiny`` folder; the naive reference
  and the plain providers keep the full VAE), ``compile`` (the transformer forward on
  ``backend``, a torch.compile mode; inside a captured round its compilation without CUDA
  graphs) and ``fp8`` (the search's forwards through a float8 copy of the transformer,
  :func:`smartgrpo_fast.models.fp8.float8_transformer`; CUDA, compute capability >= 8.9).
  ``graph+preview+compile`` is the whole fast path.

Models: ``tiny`` (the embedded pixel-space model, prompt-matching reward ``tiny``),
``sd3-tiny`` (the tiny random SD3 pipeline: VAE decode, latents (16, 32, 32)) and
``sd35-medium`` (SD3.5-medium's transformer and the SD3 VAE with random weights at 512 px;
build on a GPU). The SD3 models use random conditioning and the analytic ``tiny-color``
reward on the decoded images, so the timing is the search's own, not a reward model's; give
:func:`run` a reward (``bench search --reward imagereward --reward-arg imagereward.random=true``)
to time the search with a reward model's cost, as a training step pays it.

Rows use the benchmarks' CSV schema (:data:`smartgrpo_fast.bench.rows.CSV_FIELDS`):

* op ``search``, x = B*K*N candidates per call: ``time`` (ms per search), ``throughput``
  (candidates/s) and ``speedup`` (reference / provider) rows;
* op ``search``, peak memory of one whole search, unit ``bytes`` (median = p20 = p80):
  on CUDA ``peak_cuda_bytes`` (``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats``: everything allocated, model weights included) and
  ``peak_cuda_over_start_bytes`` (that peak less what was allocated when the search began);
  on CPU ``peak_rss_bytes`` (the process's peak resident set, VmHWM, reset through
  ``/proc/self/clear_refs`` before the search: Python, torch and the model included) and
  ``peak_rss_over_start_bytes`` (that peak less the resident set when the search began).
  Where VmHWM cannot be reset (not Linux) the CPU rows are ``max_rss_bytes`` and
  ``max_rss_over_start_bytes``: the process's lifetime peak (``getrusage``), which an earlier,
  larger call can hide;
* the stage split of one round (reference and fused; ``graph`` replays a round whole): op
  ``round:<stage>`` for each stage of :data:`STAGES`, x = B*K candidates per round, a
  ``stage_time`` row (unit ``s``, median/p20/p80 over the N rounds of each of the timed
  searches) and a ``stage_fraction`` row (unit ``of round``: median = the stage's median over
  the sum of the six medians, so the medians of a provider sum to 1; p20/p80 = quantiles of
  the per-round fractions). Every provider but plain ``graph`` (whose round is ``fused``'s) is
  split; a ``graph+...`` variant's split runs its stages one by one with the code its graph
  captured (:func:`smartgrpo_fast.graphs.enclosing_graph`: the compile option's compilation
  without CUDA graphs), not the replay.

The split runs the stages of a round one at a time, a device synchronize and a
``time.perf_counter`` timer around each: ``sample`` (fused: ``sample_perturb``; reference:
``torch.randn`` then ``mean + scale * (mu + sigma * n)``), ``forward`` (``model.velocity``),
``x0`` (``x0_estimate``; reference: ``(z - t v) / scaling + shift``), ``decode``
(``model.decode``), ``reward`` (the reward, NaN/inf made NaN) and ``select/update`` (fused:
``topk_select``, ``cem_update`` and the round's statistics; reference:
``topk_select_reference`` and the elites' mean and std over the materialised noise). The
stages are those of ``NoiseSearch._round`` and of ``search_reference``'s loop, on the same
state, so the split says where a round's time goes (the synchronizes make the split's sum
a little larger than a round of the whole-search timing on CUDA). :func:`plot_stage_split`
draws it as stacked bars from the CSV.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from smartgrpo_fast.bench.case import DTYPES, CaseShape, OpCase, parse_device
from smartgrpo_fast.bench.report import new_figure, run_caption, save_figure
from smartgrpo_fast.bench.rows import measurement_rows, ratio_row, read_csv
from smartgrpo_fast.bench.runinfo import RunInfo, collect_run_info
from smartgrpo_fast.bench.timing import measure, quantile, summarize, synchronize
from smartgrpo_fast.graphs import enclosing_graph
from smartgrpo_fast.models.sd3_configs import PREVIEW_RANDOM, preview_decoder_for
from smartgrpo_fast.ops import topk_select_reference
from smartgrpo_fast.rewards.base import prepare_prompts
from smartgrpo_fast.search import NoiseSearch, SearchConfig, search_reference
from smartgrpo_fast.search.cem import finite_or_nan

__all__ = [
    "COMPILE_BACKENDS",
    "MODELS",
    "OPTIONS",
    "PREVIEW_RANDOM",
    "PROVIDERS",
    "SPLIT_PROVIDERS",
    "STAGES",
    "SearchBenchConfig",
    "canonical_provider",
    "format_search_table",
    "parse_provider",
    "peak_memory",
    "plot_stage_split",
    "run",
]

MODELS = ("tiny", "sd3-tiny", "sd35-medium")
#: The base providers (see the module docstring); ``fused`` and ``graph`` take options.
PROVIDERS = ("reference", "fused", "graph")
#: Options of a ``fused+...`` / ``graph+...`` variant, in the order their names are written.
OPTIONS = ("preview", "compile", "fp8")
#: The transformer backends of the ``compile`` option.
COMPILE_BACKENDS = ("compile-reduce-overhead", "compile-max-autotune")
#: The stages of one round, in order (see the module docstring).
STAGES: tuple[str, ...] = ("sample", "forward", "x0", "decode", "reward", "select/update")
#: The base providers whose round is split into :data:`STAGES` (``graph``'s round is
#: ``fused``'s; a ``graph+...`` variant is split, see the module docstring).
SPLIT_PROVIDERS: tuple[str, ...] = ("reference", "fused")


def parse_provider(name: str) -> tuple[str, tuple[str, ...]]:
    """(base, options) of a provider name such as ``graph+preview+compile``; options come back
    in :data:`OPTIONS` order. ValueError naming what is wrong."""
    base, *opts = name.split("+")
    if base not in PROVIDERS:
        raise ValueError(
            f"providers: {name!r}: expected {', '.join(PROVIDERS)}, or fused / graph with "
            f"+options from {', '.join(OPTIONS)}"
        )
    for opt in opts:
        if opt not in OPTIONS:
            raise ValueError(f"providers: {name!r}: unknown option {opt!r}; expected "
                             f"{', '.join(OPTIONS)}")  # fmt: skip
    if len(set(opts)) != len(opts):
        raise ValueError(f"providers: {name!r}: an option given twice")
    if opts and base == "reference":
        raise ValueError(f"providers: {name!r}: the naive reference takes no options")
    return base, tuple(o for o in OPTIONS if o in opts)


def canonical_provider(name: str) -> str:
    """A provider's name with its options in :data:`OPTIONS` order (``graph+compile+preview``
    is ``graph+preview+compile``)."""
    base, options = parse_provider(name)
    return "+".join((base, *options))


_PROMPT = "a red circle on a blue background"
_STAGE_OP = "round:"


@dataclass(frozen=True)
class SearchBenchConfig:
    """What the search benchmark runs (see the module docstring).

    Attributes:
        model: one of :data:`MODELS`.
        providers: from :data:`PROVIDERS` (``graph`` needs CUDA).
        batch: rollouts per search (B).
        k, rounds, top: the search's K, N and T.
        dtype: model dtype; device: ``cpu`` or ``cuda[:N]``.
        repeats, warmup: timed and untimed searches, for the whole-search timing and again
            for the stage split (``repeats * rounds`` timed rounds per stage).
        preview_decoder: the ``preview`` option's decoder: :data:`PREVIEW_RANDOM` or a local
            ``AutoencoderTiny`` folder.
        backend: the ``compile`` option's transformer backend (:data:`COMPILE_BACKENDS`).
        decode_size: the search's ``decode_size`` (resize before the reward), every provider.
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
    preview_decoder: str = PREVIEW_RANDOM
    backend: str = "compile-reduce-overhead"
    decode_size: int | None = None

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model: expected one of {', '.join(MODELS)}, got {self.model!r}")
        cuda = parse_device(self.device).type == "cuda"
        for p in self.providers:
            base, opts = parse_provider(p)
            if base == "graph" and not cuda:
                raise ValueError(f"providers: {p} needs a CUDA device")
            if opts and self.model == "tiny":
                raise ValueError(f"providers: {p}: options need an SD3 model (sd3-tiny, "
                                 "sd35-medium); the embedded model decodes nothing")  # fmt: skip
            if "fp8" in opts:
                from smartgrpo_fast.models.fp8 import check_float8

                try:  # CUDA, capability >= 8.9, torchao: before any model is built
                    check_float8(parse_device(self.device))
                except RuntimeError as err:
                    raise ValueError(f"providers: {p}: {err}") from None
        if self.backend not in COMPILE_BACKENDS:
            raise ValueError(
                f"backend: expected one of {', '.join(COMPILE_BACKENDS)}, got {self.backend!r}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        SearchConfig(k=self.k, rounds=self.rounds, top=self.top,
                     decode_size=self.decode_size)  # validates K, N, T  # fmt: skip
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


def _preview_decoder(config: SearchBenchConfig, model: Any) -> Any:
    """The ``preview`` option's decoder for ``model`` (random TAESD3 or a folder)."""
    return preview_decoder_for(config.preview_decoder, model)


class _Variants:
    """The model of each option set, built once: SD3FlowModels sharing the base model's
    weights, with a preview decoder, a compiled forward and / or a float8 transformer."""

    def __init__(
        self, config: SearchBenchConfig, base: Any, say: Callable[[str], None] | None = None
    ) -> None:
        self.config, self.base = config, base
        self.say = say or (lambda _msg: None)
        self._models: dict[tuple[str, ...], Any] = {(): base}
        self._preview: Any = None
        self._fp8: Any = None

    def model(self, options: tuple[str, ...]) -> Any:
        if options not in self._models:
            self._models[options] = self._build(options)
        return self._models[options]

    def _build(self, options: tuple[str, ...]) -> Any:
        from smartgrpo_fast.graphs import GraphConfig
        from smartgrpo_fast.models.sd3 import SD3FlowModel

        base = self.base
        if "fp8" in options:
            if self._fp8 is None:
                from smartgrpo_fast.models.fp8 import float8_transformer, versions

                self.say(f"fp8: quantizing a copy of the transformer ({versions()})")
                start = time.perf_counter()
                self._fp8 = float8_transformer(base.transformer)
                synchronize(base.device)
                linears = sum(type(getattr(m, "weight", None)).__name__ == "Float8Tensor"
                              for m in self._fp8.modules())  # fmt: skip
                self.say(f"fp8: {linears} linear layers in float8, "
                         f"{time.perf_counter() - start:.1f} s")  # fmt: skip
            base = base.with_transformer(self._fp8)
        if "preview" in options and self._preview is None:
            self._preview = _preview_decoder(self.config, base)
        backend = self.config.backend if "compile" in options else "eager"
        cfg = replace(base.config, graph=GraphConfig(backend=backend))
        return SD3FlowModel(
            base.pipe,
            cfg,
            name=f"{self.base.name}+{'+'.join(options)}",
            preview_decoder=self._preview if "preview" in options else None,
        )


# --------------------------------------------------------------------------------------
# Peak memory
# --------------------------------------------------------------------------------------


def _proc_status_bytes(field: str) -> int:
    """``field`` (VmRSS, VmHWM) of /proc/self/status in bytes; OSError when unreadable."""
    text = Path("/proc/self/status").read_text()
    found = re.search(rf"^{field}:\s*(\d+) kB", text, re.MULTILINE)
    if found is None:
        raise OSError(f"/proc/self/status has no {field}")
    return int(found.group(1)) * 1024


def _max_rss_bytes() -> int:
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # KiB on Linux, bytes on macOS


def peak_memory(fn: Callable[[], object], device: torch.device) -> tuple[str, int, int]:
    """Run ``fn()`` once; return (metric, peak bytes, peak less the bytes at the start).

    The metric names what was measured (module docstring): ``peak_cuda_bytes`` on CUDA,
    ``peak_rss_bytes`` on Linux CPUs (VmHWM reset before the call), else ``max_rss_bytes``
    (the process's lifetime peak resident set).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        with torch.no_grad():
            fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return "peak_cuda_bytes", peak, peak - start
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        start = _proc_status_bytes("VmRSS")
        with torch.no_grad():
            fn()
        peak = _proc_status_bytes("VmHWM")
        return "peak_rss_bytes", peak, max(peak - start, 0)
    except OSError:
        start = _max_rss_bytes()
        with torch.no_grad():
            fn()
        peak = _max_rss_bytes()
        return "max_rss_bytes", peak, peak - start


# --------------------------------------------------------------------------------------
# One round, stage by stage
# --------------------------------------------------------------------------------------


class _StagedRound:
    """One provider's round split into :data:`STAGES`: :meth:`reset` starts a search, then
    :meth:`stages` run in order once per round; tensors pass from stage to stage through
    ``self``. ``mean`` (B, *S) float32 and ``scale`` (B,) float32 as the search validated."""

    def __init__(
        self,
        model: Any,
        reward: Any,
        cfg: SearchConfig,
        mean: torch.Tensor,
        scale: torch.Tensor,
        t_next: float,
        cond: Any,
    ) -> None:
        self.model, self.reward_fn, self.cfg, self.cond = model, reward, cfg, cond
        self.mean, self.scale, self.t_next = mean, scale, t_next
        self.b, self.k, self.s = mean.shape[0], cfg.k, tuple(mean.shape[1:])
        self.dev = mean.device
        self.prompts = [p for p in cond.prompts for _ in range(cfg.k)]
        self.scaling = float(getattr(model, "scaling_factor", 1.0))
        self.shift = float(getattr(model, "shift_factor", 0.0))

    def stages(self) -> tuple[Callable[[], None], ...]:
        return (self.sample, self.forward, self.x0, self.decode, self.reward, self.select_update)

    def _decode_images(self, x0: torch.Tensor) -> torch.Tensor:
        size = self.cfg.decode_size
        return self.model.decode(x0) if size is None else self.model.decode(x0, size=size)

    def decode(self) -> None:
        self.images = self._decode_images(self.x0_latent)

    def reset(self) -> None:
        raise NotImplementedError

    def sample(self) -> None:
        raise NotImplementedError

    def forward(self) -> None:
        raise NotImplementedError

    def x0(self) -> None:
        raise NotImplementedError

    def reward(self) -> None:
        raise NotImplementedError

    def select_update(self) -> None:
        raise NotImplementedError


class _FusedRound(_StagedRound):
    """``NoiseSearch._round``, stage by stage: its own stage methods, on the state
    ``NoiseSearch`` starts from."""

    def __init__(self, search: NoiseSearch, *args: Any) -> None:
        super().__init__(search.model, search.reward, search.config, *args)
        self.search = search
        self.prepared = prepare_prompts(search.reward, self.prompts, self.dev)

    def reset(self) -> None:
        self.st = self.search._initial_state(self.mean, self.scale, self.t_next, self.cfg.seed)

    def sample(self) -> None:
        self.z = self.search._sample(self.st)

    def forward(self) -> None:
        self.ahead = self.search._forward(self.st, self.z, self.cond)

    def x0(self) -> None:
        self.x0_latent = self.search._x0(self.st, self.ahead)

    def decode(self) -> None:
        self.images = self.search._decode(self.x0_latent)

    def reward(self) -> None:
        self.r = self.search._score(self.st, self.images, self.prepared)

    def select_update(self) -> None:
        self.search._select_update(self.st, self.r, self.ahead.v0)


class _ReferenceRound(_StagedRound):
    """``search_reference``'s loop body with ``noise="torch"``, stage by stage; the noise is
    drawn on the device from ``generator`` (a generator on that device)."""

    def __init__(self, *args: Any, generator: torch.Generator) -> None:
        super().__init__(*args)
        self.gen = generator
        self.ones = [1] * len(self.s)

    def reset(self) -> None:
        cfg, b, dev = self.cfg, self.b, self.dev
        self.mu = torch.full(self.mean.shape, cfg.mu0, device=dev)
        self.sigma = torch.full(self.mean.shape if cfg.per_element else (b,), cfg.sigma0,
                                device=dev)  # fmt: skip
        self.best_r = torch.full((b,), float("-inf"), device=dev)
        self.best_eps = self.mu.clone()
        self.stats = torch.full((4, cfg.rounds, b), float("nan"), device=dev)
        self.rnd = 0

    def sample(self) -> None:
        b, k, s, ones = self.b, self.k, self.s, self.ones
        sig = self.sigma.unsqueeze(1) if self.cfg.per_element else self.sigma.view(b, 1, *ones)
        noise = torch.randn((b, k, *s), generator=self.gen, device=self.dev)
        self.eps = self.mu.unsqueeze(1) + sig * noise  # (B, K, *S)
        z = self.mean.unsqueeze(1) + self.scale.view(b, 1, *ones) * self.eps
        self.z = z.reshape(b * k, *s)

    def forward(self) -> None:
        self.v = self.model.velocity(self.z, self.t_next, self.cond, k=self.k).float()

    def x0(self) -> None:
        self.x0_latent = (self.z - self.t_next * self.v) / self.scaling + self.shift

    def reward(self) -> None:
        r = self.reward_fn(self.images, self.prompts).float().to(self.dev)
        self.r = finite_or_nan(r.view(self.b, self.k))

    def select_update(self) -> None:
        cfg, r, b, s, ones = self.cfg, self.r, self.b, self.s, self.ones
        elite = topk_select_reference(r, cfg.top)
        r_elite = r.gather(1, elite)
        self.stats[:, self.rnd] = torch.stack(
            [r_elite[:, 0], r_elite.mean(1), r.nanmean(1), torch.isnan(r).sum(1).float()]
        )
        better = r_elite[:, 0] > self.best_r
        self.best_r = torch.where(better, r_elite[:, 0], self.best_r)
        eps_best = self.eps[torch.arange(b, device=self.dev), elite[:, 0]]
        self.best_eps = torch.where(better.view(b, *ones), eps_best, self.best_eps)
        if cfg.strategy == "cem":
            eps_e = self.eps.gather(1, elite.view(b, cfg.top, *ones).expand(b, cfg.top, *s))
            a = cfg.alpha
            self.mu = (1 - a) * self.mu + a * eps_e.mean(1)
            var = eps_e.var(1, unbiased=False)
            spread = var.sqrt() if cfg.per_element else var.flatten(1).mean(1).sqrt()
            self.sigma = ((1 - a) * self.sigma + a * spread).clamp_min(cfg.min_sigma)
        self.rnd += 1


def _time_stages(
    staged: _StagedRound,
    rounds: int,
    device: torch.device,
    *,
    warmup: int,
    repeats: int,
    as_captured: bool = False,
) -> dict[str, list[float]]:
    """Seconds per stage of each of the ``repeats * rounds`` timed rounds (after ``warmup``
    untimed searches), a device synchronize and a timer around each stage; ``as_captured``:
    inside :func:`~smartgrpo_fast.graphs.enclosing_graph` (the code a captured round runs)."""
    stages = staged.stages()
    samples: dict[str, list[float]] = {name: [] for name in STAGES}
    context = enclosing_graph() if as_captured else contextlib.nullcontext()
    with torch.no_grad(), context:
        for i in range(warmup + repeats):
            staged.reset()
            for _ in range(rounds):
                for name, stage in zip(STAGES, stages, strict=True):
                    synchronize(device)
                    start = time.perf_counter()
                    stage()
                    synchronize(device)
                    if i >= warmup:
                        samples[name].append(time.perf_counter() - start)
    return samples


def _stage_rows(base: Mapping[str, Any], samples: Mapping[str, list[float]]) -> list[dict]:
    """``stage_time`` (s) and ``stage_fraction`` rows of one provider (module docstring)."""
    times = {name: summarize(samples[name]) for name in STAGES}
    total = sum(t.median for t in times.values())
    n = len(samples[STAGES[0]])
    per_round = [sum(samples[name][i] for name in STAGES) for i in range(n)]
    rows = []
    for name in STAGES:
        t = times[name]
        fractions = [samples[name][i] / per_round[i] if per_round[i] > 0 else 0.0
                     for i in range(n)]  # fmt: skip
        op = {**base, "op": _STAGE_OP + name, "repeats": n}
        rows.append({**op, "metric": "stage_time", "unit": "s",
                     "median": t.median, "p20": t.p20, "p80": t.p80})  # fmt: skip
        rows.append({**op, "metric": "stage_fraction", "unit": "of round",
                     "median": t.median / total if total > 0 else 0.0,
                     "p20": quantile(fractions, 0.2), "p80": quantile(fractions, 0.8)})  # fmt: skip
    return rows


# --------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------


def _progress(log: Callable[[str], None] | None) -> Callable[[str], None]:
    """``say(msg)``: ``log("[  12.3 s] msg")``, seconds since this call; nothing without
    ``log``."""
    start = time.perf_counter()

    def say(msg: str) -> None:
        if log is not None:
            log(f"[{time.perf_counter() - start:7.1f} s] {msg}")

    return say


def run(
    config: SearchBenchConfig,
    reward: Any | None = None,
    *,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """Time one search per provider and split a round into stages; rows as described in
    the module docstring (time, throughput, peak memory per provider; the stage rows of the
    split providers; the speedup rows last).

    ``reward``: the reward the search scores with, built on the config's device (default: the
    model's analytic one, module docstring), e.g. a full-size ImageReward to time the search
    as a trainer's step runs it.

    ``log``: called with one line as each part starts or ends (the versions, the model built,
    the float8 copy made, each provider's first call, timing, memory and split, with the
    seconds since the start), so that a run cut short says how far it came.
    """
    say = _progress(log)
    device = parse_device(config.device)
    info = collect_run_info(device)
    fp8 = any("fp8" in parse_provider(p)[1] for p in config.providers)
    if fp8:
        from smartgrpo_fast.models.fp8 import versions

        libs = versions()
    else:
        libs = f"torch {torch.__version__}"
    say(f"bench search: {config.model} on {info.device_name} ({device}), {config.dtype}, "
        f"{libs}; providers {' '.join(config.providers)}")  # fmt: skip
    model, default_reward, cond = _model_and_cond(config)
    reward = default_reward if reward is None else reward
    say("model built")
    search = SearchConfig(k=config.k, rounds=config.rounds, top=config.top, graph=False,
                          decode_size=config.decode_size)  # fmt: skip
    gen = torch.Generator(device=device).manual_seed(1)
    mean = torch.randn((config.batch, *model.latent_shape), generator=gen, device=device)
    scale, t_next = 0.3, 0.8
    scale_t = torch.full((config.batch,), scale, device=device)
    variants = _Variants(config, model, say) if any("+" in p for p in config.providers) else None
    shape = CaseShape(batch=config.batch, k=config.k, latent=tuple(model.latent_shape),
                      elites=config.top)  # fmt: skip
    rows: list[dict] = []
    for provider in config.providers:
        base, options = parse_provider(provider)
        m = model if not options else variants.model(options)
        if base == "reference":
            torch_gen = torch.Generator(device=device).manual_seed(2)  # on the device: fair

            def call(m=m, torch_gen=torch_gen):
                return search_reference(m, reward, mean, scale, t_next, cond, search,
                                        noise="torch", generator=torch_gen)  # fmt: skip

            staged: _StagedRound | None = _ReferenceRound(
                m, reward, search, mean, scale_t, t_next, cond,
                generator=torch.Generator(device=device).manual_seed(3),
            )  # fmt: skip
        else:
            ns = NoiseSearch(m, reward, replace(search, graph=base == "graph"))

            def call(ns=ns):
                return ns.run(mean, scale, t_next, cond)

            # plain graph's round is fused's: not split again
            staged = None if provider == "graph" else _FusedRound(
                NoiseSearch(m, reward, search), mean, scale_t, t_next, cond)  # fmt: skip
        provider_rows = _provider_rows(config, provider, call, shape, m.dtype, device, info,
                                       say)  # fmt: skip
        rows += provider_rows
        if staged is not None:
            say(f"{provider}: stage split, {config.warmup} + {config.repeats} searches")
            samples = _time_stages(staged, config.rounds, device, warmup=config.warmup,
                                   repeats=config.repeats, as_captured=base == "graph")  # fmt: skip
            base_row = {**provider_rows[0], "x_name": "candidates/round",
                        "x": shape.batch * shape.k}  # fmt: skip
            rows += _stage_rows(base_row, samples)
        say(f"{provider}: done")
    ref = next((r for r in rows if r["provider"] == "reference" and r["metric"] == "time"), None)
    if ref is not None:
        for r in [r for r in rows if r["metric"] == "time" and r["provider"] != "reference"]:
            rows.append(ratio_row(r, ref, "reference/provider"))
    return rows


def _provider_rows(
    config: SearchBenchConfig,
    provider: str,
    call: Callable[[], object],
    shape: CaseShape,
    dtype: torch.dtype,
    device: torch.device,
    info: RunInfo,
    say: Callable[[str], None],
) -> list[dict]:
    """The ``time`` (first), ``throughput`` and two peak-memory rows of one provider; the
    first warm-up search is timed apart for ``say`` (it holds any capture and compilation)."""
    candidates = shape.batch * shape.k * config.rounds
    case = OpCase("search", provider, shape, dtype, device, call, 0)
    warmup = config.warmup
    if warmup:
        say(f"{provider}: first search (warm-up)")
        start = time.perf_counter()
        with torch.no_grad():
            call()
        synchronize(device)
        say(f"{provider}: first search took {time.perf_counter() - start:.1f} s")
        warmup -= 1
    say(f"{provider}: timing {warmup} + {config.repeats} searches")
    timing = measure(call, device, warmup=warmup, repeats=config.repeats)
    say(f"{provider}: {timing.median:.1f} ms per search (median of {config.repeats}), "
        f"{candidates / (timing.median * 1e-3):.1f} candidates/s")  # fmt: skip
    time_row = next(r for r in measurement_rows(case, timing, info, config.repeats)
                    if r["metric"] == "time")  # fmt: skip
    time_row |= {"x_name": "candidates", "x": candidates}
    throughput = {**time_row, "metric": "throughput", "unit": "candidates/s",
                  "median": candidates / (timing.median * 1e-3),
                  "p20": candidates / (timing.p80 * 1e-3),
                  "p80": candidates / (timing.p20 * 1e-3)}  # fmt: skip
    metric, peak, over = peak_memory(call, device)
    say(f"{provider}: peak memory {peak / 2**20:.0f} MiB ({metric})")
    mem = {**time_row, "unit": "bytes", "repeats": 1}
    return [
        time_row,
        throughput,
        {**mem, "metric": metric, "median": peak, "p20": peak, "p80": peak},
        {**mem, "metric": metric.removesuffix("_bytes") + "_over_start_bytes",
         "median": over, "p20": over, "p80": over},
    ]  # fmt: skip


# --------------------------------------------------------------------------------------
# Table and plot
# --------------------------------------------------------------------------------------

_MEMORY_LABELS = {"peak_cuda_bytes": "peak CUDA", "peak_rss_bytes": "peak RSS",
                  "max_rss_bytes": "max RSS"}  # fmt: skip


def _stage(row: Mapping[str, Any]) -> str | None:
    """The stage of a stage row, None for other rows."""
    op = str(row["op"])
    return op.removeprefix(_STAGE_OP) if op.startswith(_STAGE_OP) else None


def format_search_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """One line per provider (ms per search, candidates/s, speed-up over the reference, peak
    memory in MiB and its rise over the start); then, when the rows have a stage split, one
    line per stage: each split provider's median ms per round and share of the round."""
    speed = {r["provider"]: r["median"] for r in rows if r["metric"] == "speedup"}
    memory = {(r["provider"], r["metric"]): r["median"] for r in rows if r["unit"] == "bytes"}
    mem_metric = next((m for _, m in memory if m in _MEMORY_LABELS), None)
    mem_head = (
        "" if mem_metric is None else f" {_MEMORY_LABELS[mem_metric] + ' MiB':>14} {'+MiB':>8}"
    )
    wide = max([10, *(len(str(r["provider"])) for r in rows)])
    lines = [f"{'provider':<{wide}} {'candidates':>10} {'ms/search':>10} {'cand/s':>10} "
             f"{'vs ref':>8}" + mem_head]  # fmt: skip
    for r in rows:
        if r["metric"] != "time" or _stage(r) is not None:
            continue
        s, p = speed.get(r["provider"]), r["provider"]
        line = (
            f"{p:<{wide}} {r['x']:>10} {r['median']:>10.1f} "
            f"{1e3 * r['x'] / r['median']:>10.1f} {'-' if s is None else f'{s:.2f}x':>8}"
        )
        if mem_metric is not None and (p, mem_metric) in memory:
            over = memory.get((p, mem_metric.removesuffix("_bytes") + "_over_start_bytes"), 0)
            line += f" {memory[(p, mem_metric)] / 2**20:>14.1f} {over / 2**20:>8.1f}"
        lines.append(line)
    split = [r for r in rows if _stage(r) is not None]
    if not split:
        return "\n".join(lines)
    providers = list(dict.fromkeys(r["provider"] for r in split))
    stages = [s for s in STAGES if any(_stage(r) == s for r in split)]
    value = {(r["provider"], _stage(r), r["metric"]): r["median"] for r in split}
    n = next(r["repeats"] for r in split)
    col = max([18, *(len(p) for p in providers)])
    lines += [
        "",
        f"stage split of a round: median ms over {n} rounds (share of the stages' sum)",
        f"{'stage':<14}" + "".join(f" {p:>{col}}" for p in providers),
    ]
    for stage in [*stages, "sum"]:
        cells = []
        for p in providers:
            if stage == "sum":
                ms = 1e3 * sum(value.get((p, s, "stage_time"), 0.0) for s in stages)
                cells.append(f" {ms:>{col - 8}.3f} (100.0%)")
                continue
            sec = value.get((p, stage, "stage_time"))
            frac = value.get((p, stage, "stage_fraction"), 0.0)
            cells.append(
                f" {'-':>{col}}"
                if sec is None
                else f" {1e3 * sec:>{col - 8}.3f} ({100 * frac:>5.1f}%)"
            )
        lines.append(f"{stage:<14}" + "".join(cells))
    return "\n".join(lines)


def plot_stage_split(csv_path: Path | str, png_path: Path | str | None = None) -> Path:
    """Draw the stage split of a CSV written from :func:`run`'s rows as stacked bars: one bar
    per provider, one segment per stage (median ms per round); write a PNG (default: the CSV's
    path with ``_stages.png``). ValueError when the CSV has no ``stage_time`` rows.

    Needs matplotlib (``pip install smartgrpo-fast[bench]``); uses the Agg canvas, not pyplot.
    """
    csv_path = Path(csv_path)
    png_path = (
        Path(png_path)
        if png_path is not None
        else csv_path.with_name(csv_path.stem + "_stages.png")
    )
    rows = [r for r in read_csv(csv_path) if r["metric"] == "stage_time" and _stage(r)]
    if not rows:
        raise ValueError(f"{csv_path}: no 'stage_time' rows to plot")
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    found = list(dict.fromkeys(_stage(r) for r in rows))
    stages = [s for s in STAGES if s in found] + [s for s in found if s not in STAGES]
    ms = {(r["provider"], _stage(r)): 1e3 * r["median"] for r in rows}
    fig = new_figure(max(6.4, 3.4 + 1.4 * len(providers)), 4.8)
    ax = fig.subplots()
    bottom = [0.0] * len(providers)
    for stage in stages:
        heights = [ms.get((p, stage), 0.0) for p in providers]
        ax.bar(providers, heights, bottom=bottom, label=stage, width=0.6)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    for i, total in enumerate(bottom):
        label = f"{total:,.0f} ms" if total >= 100 else f"{total:.3g} ms"
        ax.annotate(label, (i, total), ha="center", va="bottom", fontsize=8)
    first = rows[0]
    ax.set_ylabel("ms per round (median of each stage)")
    ax.set_title(
        f"one search round by stage: B*K = {first['x']} candidates of "
        f"({first['latent'].replace('x', ',')}), {first['dtype']}",
        fontsize=9,
    )
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], labels[::-1], title="stage", loc="upper left",
              bbox_to_anchor=(1.0, 1.0), fontsize=8)  # fmt: skip
    ax.margins(y=0.1)
    ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(run_caption(first, "search"), fontsize=8)
    return save_figure(fig, png_path)
