"""Train the embedded flow model with SD3's rectified-flow objective, reproducibly from a seed.

    python -m smartgrpo_fast.shapes.train_model --steps 7000 --seed 0 \
        --out smartgrpo_fast/shapes/weights

Each step renders a fresh batch of procedural images (nothing is stored or downloaded),
draws t from the logit-normal distribution SD3 uses, shifted toward noise (``time_shift``),
forms ``x_t = (1 - t) x0 + t eps`` and regresses the velocity ``eps - x0``. AdamW with
warm-up, a constant lr and a cosine decay over the last steps; an EMA copy is kept.
Writes ``config.json`` (the architecture and ``time_shift``, the schedule to sample on),
``flow.safetensors`` (the raw weights) and ``flow_ema.safetensors`` every 1000 steps, with
``train_state.pt`` beside them: running the same command again resumes from it and ends with
the same weights as an uninterrupted run. The guidance scale is measured afterwards
(``shapes.evaluate.generation_accuracy``) and added to ``config.json`` as ``"guidance_scale"``
(the shipped weights: 6; the defaults below are the run that made them, 51.7 min).
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from smartgrpo_fast.sde import check_time_shift, shift_times
from smartgrpo_fast.shapes.data import WEIGHTS_DIR, sample_batch, tokenize
from smartgrpo_fast.shapes.model import TinyArch, build_modules, save_weights

__all__ = ["FlowTrainConfig", "main", "train_flow"]

#: Optimizer/EMA/RNG state for resuming (not shipped: .gitignore'd, excluded from the package).
_STATE_FILE = "train_state.pt"


@dataclass(frozen=True)
class FlowTrainConfig:
    """Hyper-parameters (defaults: those the shipped weights were trained with)."""

    steps: int = 7000
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 200
    #: The lr stays at ``lr`` until the last ``decay_fraction`` of the steps, then decays (cosine)
    #: to ``final_lr_fraction * lr``. Shape binding is learnt late and only at a high lr: a
    #: cosine over the whole run (decay_fraction=1) stalled at 42% shape accuracy.
    decay_fraction: float = 0.15
    final_lr_fraction: float = 0.05
    #: Probability of training a sample on the null prompt (all ``<pad>``), which gives the
    #: model the unconditional velocity that classifier-free guidance needs. 0 = no guidance.
    uncond_prob: float = 0.1
    #: Training times are logit-normal(0, 1) samples shifted toward noise like SD3's schedule,
    #: ``s t / (1 + (s - 1) t)`` (= logit-normal with mean ln s). On flat 32x32 images the shape
    #: is decided at high noise, which logit-normal(0, 1) rarely draws (P(t > 0.8) = 8%; 35% at
    #: s = 3). 1 = no shift.
    time_shift: float = 3.0
    ema: float = 0.998
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        check_time_shift(self.time_shift, "time_shift")
        if not 0.0 <= self.uncond_prob < 1.0:
            raise ValueError(f"uncond_prob: expected 0 <= p < 1, got {self.uncond_prob}")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction: expected 0 <= f <= 1, got {self.decay_fraction}")


def _lr_factor(step: int, cfg: FlowTrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    decay_steps = max(1, round(cfg.decay_fraction * (cfg.steps - cfg.warmup)))
    progress = max(0.0, (step - (cfg.steps - decay_steps)) / decay_steps)
    cos = 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.final_lr_fraction + (1 - cfg.final_lr_fraction) * cos


def train_flow(
    cfg: FlowTrainConfig,
    arch: TinyArch | None = None,
    *,
    out: Path | None = None,
    log: Callable[[str], None] = print,
    checkpoint_every: int = 1000,
    stop_after: int | None = None,
) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """Train; return (transformer, text_encoder) of the EMA copy and a summary dict.

    With ``out``, weights and the resume state are written every ``checkpoint_every`` steps
    and at the end; an existing state there is resumed. ``stop_after`` ends this run after that
    many steps (saving first), so a long training can be done in chunks.
    """
    arch = arch or TinyArch()
    transformer, text_encoder = build_modules(arch, seed=cfg.seed)
    modules = torch.nn.ModuleDict({"transformer": transformer, "text_encoder": text_encoder})
    ema = copy.deepcopy(modules).requires_grad_(False)
    opt = torch.optim.AdamW(modules.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    gen = torch.Generator().manual_seed(cfg.seed)
    first, running = 0, 0.0
    state_file = out / _STATE_FILE if out is not None else None
    if state_file is not None and state_file.is_file():  # resume: same stream, same result
        state = torch.load(state_file, weights_only=False)
        if state["config"] != asdict(cfg) or state["arch"] != asdict(arch):
            raise ValueError(f"{state_file}: written for another config; delete it to restart")
        modules.load_state_dict(state["modules"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["generator"])
        first, running = state["step"], state["running"]
        log(f"resumed from {state_file} at step {first}")
    start = time.perf_counter()
    for step in range(first, cfg.steps):
        images, attrs = sample_batch(cfg.batch, gen)
        prompts = attrs.prompts()
        x0 = images * 2.0 - 1.0
        eps = torch.randn(x0.shape, generator=gen)
        t = shift_times(torch.sigmoid(torch.randn(cfg.batch, generator=gen)), cfg.time_shift)
        tt = t.view(-1, 1, 1, 1)
        x_t = (1.0 - tt) * x0 + tt * eps
        ids = tokenize(prompts)
        if cfg.uncond_prob > 0:
            drop = torch.rand(cfg.batch, generator=gen) < cfg.uncond_prob
            ids = torch.where(drop[:, None], torch.zeros_like(ids), ids)  # <pad> = id 0
        h, pooled = text_encoder(ids)
        pred = transformer(x_t, h, pooled, t * 1000.0, return_dict=False)[0]
        loss = F.mse_loss(pred, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), modules.parameters(), strict=True):
                p_ema.lerp_(p, 1.0 - cfg.ema)
        running = 0.98 * running + 0.02 * float(loss.detach()) if step else float(loss.detach())
        if step % 100 == 0 or step == cfg.steps - 1:
            rate = (step + 1 - first) / (time.perf_counter() - start)
            log(f"step {step:6d}  loss {running:.4f}  lr {sched.get_last_lr()[0]:.2e}  "
                f"{rate:.2f} steps/s")  # fmt: skip
        last = step == cfg.steps - 1 or (stop_after is not None and step + 1 - first >= stop_after)
        if out is not None and ((step + 1) % checkpoint_every == 0 or last):
            meta = {"step": str(step + 1), "config": str(asdict(cfg))}
            sampling = {"time_shift": cfg.time_shift}  # sample on the schedule trained on
            save_weights(out, transformer, text_encoder, arch, name="flow.safetensors",
                         metadata=meta, config=sampling)  # fmt: skip
            save_weights(out, ema["transformer"], ema["text_encoder"], arch,
                         name="flow_ema.safetensors", metadata=meta, config=sampling)  # fmt: skip
            torch.save(
                {"step": step + 1, "running": running, "config": asdict(cfg),
                 "arch": asdict(arch), "modules": modules.state_dict(), "ema": ema.state_dict(),
                 "opt": opt.state_dict(), "sched": sched.state_dict(),
                 "generator": gen.get_state()},
                state_file,
            )  # fmt: skip
        if last:
            break
    summary = {"seconds": time.perf_counter() - start, "final_loss": running, **asdict(cfg)}
    return ema["transformer"], ema["text_encoder"], summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the embedded flow model.")
    defaults = FlowTrainConfig()
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--uncond-prob", type=float, default=defaults.uncond_prob,
                        help="null-prompt probability (classifier-free guidance)")  # fmt: skip
    parser.add_argument("--time-shift", type=float, default=defaults.time_shift,
                        help="shift of the training times toward noise (1 = none)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    parser.add_argument(
        "--stop-after", type=int, default=None, help="end this run after N steps (resumable)"
    )
    args = parser.parse_args(argv)
    cfg = FlowTrainConfig(
        steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
        uncond_prob=args.uncond_prob, time_shift=args.time_shift,
    )  # fmt: skip
    _, _, summary = train_flow(cfg, out=args.out, stop_after=args.stop_after)
    print(f"done in {summary['seconds'] / 60:.1f} min, final loss {summary['final_loss']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
