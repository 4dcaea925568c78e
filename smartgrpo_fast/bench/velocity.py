"""Benchmark of the batched K-candidate velocity: eager vs CUDA graph vs torch.compile.

One call = ``SD3FlowModel.velocity`` on N = B*K latents with random conditioning of the model's
text width (77 CLIP + ``text_tokens`` T5 tokens), exactly what one search round runs. Models:

* ``tiny``: the tiny random SD3 pipeline of :mod:`smartgrpo_fast.models.sd3_configs`
  (latent (16, 32, 32));
* ``sd35-medium``: SD3.5-medium's transformer with random weights at full size (latent
  (16, 64, 64) = 512 px; build it on a GPU);
* a path: a StableDiffusion3Pipeline folder.

Every backend times the *same* call; rows use the CSV schema of :mod:`smartgrpo_fast.bench.rows`
(op ``velocity``, provider = backend, x = N rows). On CPU the ``graph`` backend falls back to
eager (a warning says so) and is reported as such.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from smartgrpo_fast.bench.case import DTYPES, CaseShape, OpCase, parse_device
from smartgrpo_fast.bench.rows import measurement_rows, ratio_row
from smartgrpo_fast.bench.runinfo import collect_run_info
from smartgrpo_fast.bench.timing import measure
from smartgrpo_fast.graphs import BACKENDS, GraphConfig

__all__ = [
    "VelocityBenchConfig",
    "build_velocity_model",
    "format_velocity_table",
    "random_cond",
    "run",
]


@dataclass(frozen=True)
class VelocityBenchConfig:
    """What the velocity benchmark runs.

    Attributes:
        model: ``tiny``, ``sd35-medium`` or a StableDiffusion3Pipeline folder.
        batches: N = B*K rows per call.
        backends: from :data:`smartgrpo_fast.graphs.BACKENDS`.
        dtype: transformer dtype (``bfloat16``, ``float16``, ``float32``).
        device: ``cpu`` or ``cuda[:N]``.
        text_tokens: T5 tokens (Flow-GRPO: 128), plus the 77 CLIP tokens.
        repeats, warmup: timed and untimed calls (warm-up also captures or compiles).
    """

    model: str = "tiny"
    batches: tuple[int, ...] = (1, 4, 16)
    backends: tuple[str, ...] = ("eager", "graph")
    dtype: str = "float32"
    device: str = "cpu"
    text_tokens: int = 128
    repeats: int = 10
    warmup: int = 3

    def __post_init__(self) -> None:
        for b in self.backends:
            if b not in BACKENDS:
                raise ValueError(f"backends: expected names from {', '.join(BACKENDS)}, got {b!r}")
        if not self.batches or any(n < 1 for n in self.batches):
            raise ValueError(f"batches: expected ints >= 1, got {self.batches!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        parse_device(self.device)
        if self.repeats < 1 or self.warmup < 1:
            raise ValueError("repeats and warmup: expected >= 1")


def build_velocity_model(config: VelocityBenchConfig, backend: str) -> Any:
    """An SD3FlowModel for ``config.model`` whose transformer forward runs on ``backend``."""
    from smartgrpo_fast.models.sd3 import SD3Config, SD3FlowModel
    from smartgrpo_fast.models.sd3_configs import build_tiny_sd3_pipeline, random_sd35_medium

    dtype, device = DTYPES[config.dtype], parse_device(config.device)
    cfg = SD3Config(graph=GraphConfig(backend=backend))
    if config.model == "tiny":
        pipe = build_tiny_sd3_pipeline(seed=0).to(device)
        if dtype != torch.float32:
            pipe.transformer.to(dtype)
        return SD3FlowModel(pipe, cfg, name="tiny-random")
    if config.model == "sd35-medium":
        transformer, vae = random_sd35_medium(dtype=dtype, device=device)
        cfg = replace(cfg, resolution=512)  # Flow-GRPO's training resolution: (16, 64, 64)
        return SD3FlowModel(_BarePipe(transformer, vae), cfg, name="sd35-medium-random")
    model = SD3FlowModel.from_pretrained(config.model, dtype=dtype, device=device)
    return SD3FlowModel(model.pipe, cfg, name=config.model)


@dataclass
class _BarePipe:
    """The two components the velocity path needs, without text encoders."""

    transformer: Any
    vae: Any


def random_cond(
    model: Any, batch: int, text_tokens: int = 128, prompts: tuple[str, ...] = ()
) -> Any:
    """A Cond of ``batch`` random embeddings of the model's text width (77 CLIP + ``text_tokens``
    T5 tokens; seed 0) for timing without text encoders; ``prompts`` label it for a reward."""
    from smartgrpo_fast.models import Cond

    cfg = model.transformer.config
    gen = torch.Generator(device=model.device).manual_seed(0)
    shape = (batch, 77 + text_tokens, cfg.joint_attention_dim)
    embeds = torch.randn(shape, generator=gen, device=model.device).to(model.dtype)
    pooled = torch.randn((batch, cfg.pooled_projection_dim), generator=gen, device=model.device).to(
        model.dtype
    )
    return Cond(embeds, pooled, prompts=prompts)


def run(config: VelocityBenchConfig) -> list[dict]:
    """Time every (backend, N); rows in the ops benchmark's CSV schema plus speedup rows
    (eager time / backend time, provider = backend, unit ``eager/backend``)."""
    device = parse_device(config.device)
    info = collect_run_info(device)
    rows: list[dict] = []
    for backend in config.backends:
        model = build_velocity_model(config, backend)
        for n in config.batches:
            cond = random_cond(model, 1, config.text_tokens)
            gen = torch.Generator(device=device).manual_seed(1)
            z = torch.randn((n, *model.latent_shape), generator=gen, device=device)
            z = z.to(model.dtype)

            def call(z=z, cond=cond, n=n, model=model) -> torch.Tensor:
                return model.velocity(z, 0.7, cond, k=n)

            shape = CaseShape(batch=1, k=n, latent=model.latent_shape, elites=0)
            case = OpCase("velocity", backend, shape, model.dtype, device, call, 0)
            timing = measure(call, device, warmup=config.warmup, repeats=config.repeats)
            for r in measurement_rows(case, timing, info, config.repeats):
                if r["metric"] == "time":
                    rows.append({**r, "x_name": "N", "x": n})
    eager = {r["x"]: r for r in rows if r["provider"] == "eager"}
    for r in list(rows):
        base = eager.get(r["x"])
        if base is not None and r["provider"] != "eager":
            rows.append(ratio_row(r, base, "eager/backend"))
    return rows


def format_velocity_table(rows: list[dict]) -> str:
    """One line per (backend, N): median ms, candidates per second, speed-up over eager."""
    speed = {(r["provider"], r["x"]): r["median"] for r in rows if r["metric"] == "speedup"}
    lines = [f"{'backend':<24} {'N':>5} {'ms':>10} {'cand/s':>10} {'vs eager':>9}"]
    for r in rows:
        if r["metric"] != "time":
            continue
        s = speed.get((r["provider"], r["x"]))
        lines.append(
            f"{r['provider']:<24} {r['x']:>5} {r['median']:>10.3f} "
            f"{1e3 * r['x'] / r['median']:>10.1f} {'-' if s is None else f'{s:.2f}x':>9}"
        )
    return "\n".join(lines)
