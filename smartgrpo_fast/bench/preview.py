"""How faithful a cheap preview is: rank agreement of its rewards with the expensive ones.

The search ranks K candidates per rollout by the reward of a *preview* of each: a clean
estimate, decoded. A cheaper preview is only as good as the ranking it keeps. On B prompts'
rollouts (seeded initial noise, the ODE to SDE step S, the step's mean and noise scale), K
candidates per prompt are drawn as the search's first round draws them, and scored several
ways on the same candidates:

* decoder rows (SD3 models with a preview decoder): the one-step estimates decoded by the
  preview decoder (``preview-decoder``) against the same estimates decoded by the VAE
  (``vae``, the reference of these rows);
* lookahead rows (every model): the estimate after m Euler steps to t = 0 (``lookahead m=1``,
  the one-step estimate, and ``lookahead m=M``) decoded by the full decoder, against the final
  image of each candidate (the rollout's remaining ODE steps, ``final``: what the search
  stands for).

Per pair, over the K candidates of each prompt: ``spearman`` (Spearman's rank correlation,
ties broken by index, non-finite rewards ranked last) and ``top_overlap`` (the share of the
reference's top T among the preview's top T); rows hold the mean over the B prompts (median
column) and the 20/80 % quantiles over prompts. Each path's ``time_per_candidate`` (ms: its
forwards, decode and reward for the B*K candidates, divided by B*K) is timed too. On the
embedded model (pixel space) there is no decoder to swap: the decoder rows are skipped with a
note.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from smartgrpo_fast.bench.case import DTYPES, parse_device
from smartgrpo_fast.bench.rows import ordered_row
from smartgrpo_fast.bench.runinfo import collect_run_info
from smartgrpo_fast.bench.timing import measure, quantile
from smartgrpo_fast.models.base import decoder_unscaling, has_preview_decoder
from smartgrpo_fast.ops import philox_normal

__all__ = [
    "PreviewBenchConfig",
    "format_preview_table",
    "rank_agreement",
    "run",
    "spearman_rows",
    "top_overlap_rows",
]


@dataclass(frozen=True)
class PreviewBenchConfig:
    """What ``bench preview`` compares (module docstring).

    Attributes:
        model: ``tiny``, ``sd3-tiny``, ``sd35-medium`` or a StableDiffusion3Pipeline folder.
        preview_decoder: an ``AutoencoderTiny`` folder, ``random`` (TAESD3's layout with
            random weights; sd3-tiny and sd35-medium) or None (no decoder rows).
        reward: the reward's name (rewards.load); None: ``tiny`` for the embedded model,
            ``tiny-color`` for the random SD3 models.
        prompts: prompts of a folder model (None: ``sample_prompts(batch, seed)``).
        batch: prompts (B); k: candidates per prompt (K); top: T of the overlap.
        preview_steps: M of the lookahead rows (1: only the one-step row).
        decode_size: resize decoded images before the reward (None: no resize).
        steps, step, noise_level: the rollout (sampling steps, the SDE step S, its noise).
        dtype, device, seed, repeats, warmup: as every benchmark's.
    """

    model: str = "tiny"
    preview_decoder: str | None = None
    reward: str | None = None
    prompts: tuple[str, ...] | None = None
    batch: int = 4
    k: int = 16
    top: int = 4
    preview_steps: int = 4
    decode_size: int | None = None
    steps: int = 10
    step: int = 4
    noise_level: float = 0.7
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    repeats: int = 3
    warmup: int = 1

    def __post_init__(self) -> None:
        for name in ("batch", "k", "top", "preview_steps", "steps", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.top > self.k:
            raise ValueError(f"top: expected <= k = {self.k}, got {self.top}")
        if not 0 <= self.step < self.steps:
            raise ValueError(f"step: expected 0 <= step < steps = {self.steps}, got {self.step}")
        if self.decode_size is not None and self.decode_size < 1:
            raise ValueError(f"decode_size: expected >= 1, got {self.decode_size}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.preview_decoder == "random" and self.model not in ("sd3-tiny", "sd35-medium"):
            raise ValueError("preview_decoder: 'random' is for sd3-tiny and sd35-medium")
        parse_device(self.device)


# ----------------------------------------------------------------------------- agreement


def _ranks(r: torch.Tensor) -> torch.Tensor:
    """(B, K) ranks 0..K-1 per row, highest reward first; non-finite last, ties by index."""
    key = torch.where(torch.isfinite(r), r.double(), torch.full_like(r.double(), -math.inf))
    order = torch.sort(-key, dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(r.shape[1], device=r.device).expand_as(order))
    return ranks.double()


def spearman_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B,) Spearman rank correlation of each row of a and b (B, K), K >= 2."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))


def top_overlap_rows(a: torch.Tensor, b: torch.Tensor, top: int) -> torch.Tensor:
    """(B,) share of b's top ``top`` (by rank) among a's top ``top``, per row."""
    in_a, in_b = _ranks(a) < top, _ranks(b) < top
    return (in_a & in_b).sum(1).double() / top


def rank_agreement(a: torch.Tensor, b: torch.Tensor, top: int) -> dict[str, torch.Tensor]:
    """``spearman`` and ``top_overlap`` (each (B,)) of preview rewards a against b (B, K)."""
    return {"spearman": spearman_rows(a, b), "top_overlap": top_overlap_rows(a, b, top)}


# ------------------------------------------------------------------------------ the set-up


def _model_reward_cond(config: PreviewBenchConfig) -> tuple[Any, Any, Any, str]:
    """(model, reward, cond, reward name) for the config."""
    from smartgrpo_fast import models, rewards
    from smartgrpo_fast.shapes import sample_prompts

    dtype, device = DTYPES[config.dtype], parse_device(config.device)
    prompts = list(config.prompts or sample_prompts(config.batch, config.seed))[: config.batch]
    if config.model in ("sd3-tiny", "sd35-medium"):
        from smartgrpo_fast.bench.search import SearchBenchConfig, _model_and_cond, _preview_decoder

        sb = SearchBenchConfig(model=config.model, batch=len(prompts), dtype=config.dtype,
                               device=config.device)  # fmt: skip
        model, _, cond = _model_and_cond(sb)
        cond = type(cond)(cond.prompt_embeds, cond.pooled, prompts=tuple(prompts))
        if config.preview_decoder is not None:
            sb = SearchBenchConfig(model=config.model, preview_decoder=config.preview_decoder)
            model.set_preview_decoder(_preview_decoder(sb, model))
        name = config.reward or "tiny-color"
        return model, rewards.load(name, device=device), cond, name
    if config.model == "tiny":
        model = models.load("tiny", device=device, dtype=dtype)
    else:
        model = models.load(config.model, device=device, dtype=dtype,
                            preview_decoder=config.preview_decoder)  # fmt: skip
    name = config.reward or "tiny"
    return model, rewards.load(name, device=device), model.encode_prompts(prompts), name


def _candidates(model: Any, cond: Any, config: PreviewBenchConfig) -> tuple[torch.Tensor, list]:
    """(B*K, *S) candidates at the SDE step's next time, and the rollout's flow times."""
    from smartgrpo_fast.sde import flow_sigmas, integrate_ode, schedule_shift, sde_step

    b, k, shape = cond.batch, config.k, tuple(model.latent_shape)
    dev = parse_device(config.device)
    sigmas = flow_sigmas(config.steps, schedule_shift(model)).tolist()
    s = config.step
    x = philox_normal((b, 1, *shape), seed=config.seed, round=0).squeeze(1).to(dev)
    x = integrate_ode(model, cond, x.to(model.dtype), sigmas[: s + 1])
    step = sde_step(x, model.velocity(x, sigmas[s], cond), sigmas[s], sigmas[s + 1],
                    noise_level=config.noise_level, sigma_max=sigmas[1])  # fmt: skip
    eps = philox_normal((b, k, *shape), seed=config.seed, round=1).to(dev)
    scale = torch.as_tensor(step.std, dtype=torch.float32, device=dev).reshape(-1)
    scale = scale.expand(b).reshape(b, 1, *[1] * len(shape))
    z = step.mean.float().unsqueeze(1) + scale * eps
    return z.reshape(b * k, *shape), sigmas[s + 1 :]


# ------------------------------------------------------------------------------- the bench


def run(config: PreviewBenchConfig) -> tuple[list[dict], list[str]]:
    """(rows, notes): the agreement and time rows (module docstring); notes say what was
    skipped and why."""
    device = parse_device(config.device)
    info = collect_run_info(device)
    model, reward, cond, reward_name = _model_reward_cond(config)
    prompts_k = [p for p in cond.prompts for _ in range(config.k)]
    b, k = cond.batch, config.k
    n = b * k
    with torch.no_grad():
        z, rest = _candidates(model, cond, config)
    t = rest[0]
    size = config.decode_size
    latent_space = hasattr(model, "vae")
    full_unscale = decoder_unscaling(model.vae.config) if latent_space else (1.0, 0.0)
    notes: list[str] = []

    def score(images: torch.Tensor) -> torch.Tensor:
        return reward(images, prompts_k).float().to(device).view(b, k)

    def decoded(x0: torch.Tensor, preview: bool = False) -> torch.Tensor:
        if preview:
            scaling, shift = model.preview_unscaling()
            return model.decode_preview(x0 / scaling + shift, size=size)
        scaling, shift = full_unscale
        x = x0 / scaling + shift
        return model.decode(x) if size is None else model.decode(x, size=size)

    def lookahead(m: int) -> torch.Tensor:
        """The m-step estimate (diffusion space) of every candidate."""
        x, t_i = z.to(model.dtype), t
        for i in range(m):
            t_n = t * (1.0 - (i + 1) / m)
            v = model.velocity(x, t_i, cond, k=k).float()
            x = (x.float() + (t_n - t_i) * v).to(model.dtype)
            t_i = t_n
        return x.float()

    def final() -> torch.Tensor:
        from smartgrpo_fast.sde import integrate_ode

        return integrate_ode(model, cond, z.to(model.dtype), rest, k=k).float()

    paths: dict[str, Callable[[], torch.Tensor]] = {}
    refs: dict[str, str] = {}
    if latent_space and has_preview_decoder(model):
        # the same one-step estimates (one_step, computed below) through each decoder
        paths["vae"] = lambda: score(decoded(one_step))
        paths["preview-decoder"] = lambda: score(decoded(one_step, preview=True))
        refs["preview-decoder"] = "vae"
    elif latent_space:
        notes.append("decoder rows skipped: no preview decoder (--preview-decoder DIR)")
    else:
        notes.append("decoder rows skipped: the embedded model works in pixel space")
    steps = sorted({1, config.preview_steps})
    for m in steps:
        paths[f"lookahead m={m}"] = lambda m=m: score(decoded(lookahead(m)))
        refs[f"lookahead m={m}"] = "final"
    paths["final"] = lambda: score(decoded(final()))
    with torch.no_grad():
        one_step = lookahead(1)
        rewards_of = {name: fn() for name, fn in paths.items()}
        times = {
            name: measure(fn, device, warmup=config.warmup, repeats=config.repeats)
            for name, fn in paths.items()
        }
    base = {"op": "preview", "mode": "forward", "x_name": "candidates/prompt", "x": k, "k": k,
            "latent": "x".join(str(s) for s in model.latent_shape), "elites": config.top,
            "dtype": config.dtype, "repeats": config.repeats, **info.as_row()}  # fmt: skip
    rows: list[dict] = []
    for name in paths:
        tm = times[name]
        rows.append(ordered_row({**base, "provider": name, "metric": "time_per_candidate",
                                 "unit": "ms", "median": tm.median / n, "p20": tm.p20 / n,
                                 "p80": tm.p80 / n}))  # fmt: skip
        if name in refs:
            agree = rank_agreement(rewards_of[name], rewards_of[refs[name]], config.top)
            for metric, values in agree.items():
                vals = values.tolist()
                unit = f"vs {refs[name]}"
                rows.append(ordered_row({**base, "provider": name, "metric": metric,
                                         "unit": unit, "median": float(values.mean()),
                                         "p20": quantile(vals, 0.2),
                                         "p80": quantile(vals, 0.8)}))  # fmt: skip
    notes.append(f"reward {reward_name}, B={b} prompts x K={k}, T={config.top}, SDE step "
                 f"{config.step}/{config.steps}")  # fmt: skip
    return rows, notes


def format_preview_table(rows: list[dict]) -> str:
    """One line per path: ms per candidate, and its Spearman and top-T overlap (mean over
    prompts) against its reference."""
    paths = list(dict.fromkeys(r["provider"] for r in rows))
    value = {(r["provider"], r["metric"]): r for r in rows}
    wide = max(len(p) for p in paths) + 1
    lines = [f"{'path':<{wide}} {'ms/cand':>10} {'against':>16} {'spearman':>9} {'top-T':>7}"]
    for p in paths:
        tm = value[(p, "time_per_candidate")]["median"]
        sp, ov = value.get((p, "spearman")), value.get((p, "top_overlap"))
        against = "-" if sp is None else sp["unit"]
        cells = ("-", "-") if sp is None else (f"{sp['median']:.3f}", f"{ov['median']:.2f}")
        lines.append(f"{p:<{wide}} {tm:>10.3f} {against:>16} {cells[0]:>9} {cells[1]:>7}")
    return "\n".join(lines)
