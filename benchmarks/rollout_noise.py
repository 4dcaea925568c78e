"""How far the trainer's SDE rollouts are from the ODE samples its evaluation scores.

GRPO improves the reward of its rollouts: ODE steps outside the SDE window, SDE steps
(``noise_level``) inside it. ``smartgrpo-fast eval`` scores 20-step ODE samples. When the SDE
steps damage the images, the update learns to repair that damage, which the ODE never shows.
This script samples, on the embedded model without training, P prompts x G rollouts with
random noise at each noise level (each rollout its own x_T, the window drawn per step as the
trainer draws it, ``--draws`` optimizer steps) and the same prompts with the ODE from P x G
fixed noises at the trainer's and at the evaluation's step counts, and prints the mean reward,
the fraction of images whose three attributes the classifier reads right, and the mean
within-prompt reward std of the rollouts (the spread GRPO's advantages come from).

    python3 benchmarks/rollout_noise.py --noise-levels 0.1 0.3 0.5 0.7 --out noise.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from smartgrpo_fast import models, rewards
from smartgrpo_fast.cli.args import float_above, int_in
from smartgrpo_fast.sde import flow_sigmas
from smartgrpo_fast.shapes import sample_prompts
from smartgrpo_fast.train.evaluate import EvalConfig, evaluate
from smartgrpo_fast.train.rollout import sample_rollouts, sde_window


def rollout_row(model, reward, prompts: list[str], args: argparse.Namespace,
                noise_level: float) -> dict:  # fmt: skip
    """Mean reward, match rate and within-prompt std of random-noise rollouts."""
    sigmas = flow_sigmas(args.steps, model.time_shift).tolist()
    rs, ms, sds = [], [], []
    for step in range(1, args.draws + 1):
        window = sde_window(args.seed, step, args.window_size, *args.window_range)
        ro = sample_rollouts(
            model, reward, prompts, first_prompt=0, group_size=args.group_size, step=step,
            seed=args.seed, sigmas=sigmas, sde_steps=window, noise="random", searcher=None,
            noise_level=noise_level, sde_type=args.sde_type, batch=args.batch,
        )  # fmt: skip
        r = ro.rewards.double().view(len(prompts), args.group_size)
        rs.append(r.mean())
        sds.append(r.std(dim=1, unbiased=False).mean())
        ms.append(reward.matches(ro.images, ro.prompts).all(dim=1).double().mean())
    return {"sampler": f"{args.sde_type} {noise_level} ({args.steps} steps)",
            "reward": float(torch.stack(rs).mean()), "match": float(torch.stack(ms).mean()),
            "group_std": float(torch.stack(sds).mean())}  # fmt: skip


def ode_row(model, reward, prompts: list[str], args: argparse.Namespace, steps: int) -> dict:
    """The ODE from P x G fixed noises (``smartgrpo-fast eval --images-per-prompt G``)."""
    cfg = EvalConfig(steps=steps, seed=args.seed, batch=args.batch,
                     images_per_prompt=args.group_size * args.draws)  # fmt: skip
    res = evaluate(model, reward, prompts, cfg)
    return {"sampler": f"ODE ({steps} steps)", "reward": res.mean, "match": res.match_rate,
            "group_std": None}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--noise-levels", type=float_above(0), nargs="+",
                   default=[0.1, 0.3, 0.5, 0.7])  # fmt: skip
    p.add_argument("--sde-type", choices=("sde", "cps"), default="sde")
    p.add_argument("--num-prompts", type=int_in(1), default=16)
    p.add_argument("--prompt-seed", type=int_in(0, 2**62), default=3000)
    p.add_argument("--group-size", type=int_in(1), default=8)
    p.add_argument("--draws", type=int_in(1), default=2, help="optimizer steps (windows) drawn")
    p.add_argument("--steps", type=int_in(1), default=10, help="the trainer's sampling steps")
    p.add_argument("--eval-steps", type=int_in(1), default=20, help="the evaluation's ODE steps")
    p.add_argument("--window-size", type=int_in(1), default=3)
    p.add_argument("--window-range", type=int_in(0), nargs=2, default=[1, 6])
    p.add_argument("--seed", type=int_in(0, 2**62), default=0)
    p.add_argument("--batch", type=int_in(1), default=64)
    p.add_argument("--out", type=Path, default=None, help="JSON lines, one per sampler")
    args = p.parse_args(argv)
    model, reward = models.load("tiny"), rewards.load("tiny")
    prompts = sample_prompts(args.num_prompts, args.prompt_seed)
    rows = []

    def timed(run, *run_args) -> None:
        t0 = time.perf_counter()
        rows.append(run(model, reward, prompts, args, *run_args)
                    | {"seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    for steps in dict.fromkeys((args.steps, args.eval_steps)):
        timed(ode_row, steps)
    for noise_level in args.noise_levels:
        timed(rollout_row, noise_level)
    n = args.num_prompts * args.group_size * args.draws
    print(f"\n{args.num_prompts} prompts (seed {args.prompt_seed}) x {args.group_size} x "
          f"{args.draws} draws = {n} images per sampler; window {args.window_size} of "
          f"[{args.window_range[0]}, {args.window_range[1]})\n")  # fmt: skip
    print("| sampler | reward | match | within-prompt std |\n|---|---:|---:|---:|")
    for r in rows:
        std = "–" if r["group_std"] is None else f"{r['group_std']:.3f}"
        print(f"| {r['sampler']} | {r['reward']:.3f} | {r['match']:.1%} | {std} |")
    if args.out is not None:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
