"""Would antithetic SDE noise (pairs +eps, -eps within a group) reduce GRPO's gradient noise?

At one SDE step from a state all rows of a prompt share (the ODE from one x_T up to it), draw H
pairs of noises +eps and -eps, finish every rollout with the ODE and score it. The reward splits
into an odd part (r+ - r-)/2 and an even part (r+ + r-)/2. A pair's score-function estimate
(r+ - r-) eps has ``2 * odd_share`` times the variance of two independent draws' (to the
extent the noise dominates the estimate), where ``odd_share = E[odd^2] / Var(r)``: antithetic
pairs help only where ``odd_share < 0.5``. Prints the share per SDE step, pooled over prompts.

    python3 benchmarks/antithetic_share.py --noise-level 0.3 --out share.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from smartgrpo_fast import models, rewards
from smartgrpo_fast.cli.args import float_above, int_in
from smartgrpo_fast.sde import flow_sigmas, ode_step, sde_step
from smartgrpo_fast.shapes import sample_prompts


@torch.no_grad()
def odd_share(model, reward, prompts: list[str], sigmas: list[float], sde_at: int, pairs: int,
              noise_level: float, seed: int) -> dict[str, float]:  # fmt: skip
    """Rewards of ``pairs`` antithetic pairs per prompt with the SDE at step ``sde_at``;
    returns the pooled odd share and the mean within-prompt reward variance."""
    n_p, n_steps = len(prompts), len(sigmas) - 1
    g = torch.Generator().manual_seed(seed)
    cond = model.encode_prompts(prompts)
    x = torch.randn((n_p, *model.latent_shape), generator=g)  # (P, C, H, W)
    for i in range(sde_at):
        x = ode_step(x, model.velocity(x, sigmas[i], cond), sigmas[i], sigmas[i + 1])
    st = sde_step(x, model.velocity(x, sigmas[sde_at], cond), sigmas[sde_at],
                  sigmas[sde_at + 1], noise_level=noise_level, sigma_max=sigmas[1])  # fmt: skip
    eps = torch.randn((pairs, n_p, *model.latent_shape), generator=g)
    xs = (st.mean + st.std * torch.cat([eps, -eps])).flatten(0, 1)  # (2 H P, C, H, W)
    rows = list(range(n_p)) * (2 * pairs)
    c = cond.select(rows)
    for i in range(sde_at + 1, n_steps):
        xs = ode_step(xs, model.velocity(xs, sigmas[i], c), sigmas[i], sigmas[i + 1])
    r = reward(model.decode(xs), [prompts[p] for p in rows]).double().view(2, pairs, n_p)
    if not torch.isfinite(r).all():
        raise FloatingPointError(f"SDE step {sde_at}: non-finite rewards")
    odd = (r[0] - r[1]) / 2  # (H, P)
    # (P,) population variance over the 2H rollouts = mean(odd^2) + var(even): share in [0, 1]
    var = r.flatten(0, 1).var(dim=0, unbiased=False)
    if not bool(var.sum() > 0):
        raise ValueError(f"SDE step {sde_at}: the rewards do not vary within any prompt")
    return {"sde_step": sde_at, "odd_share": float(odd.pow(2).mean(0).sum() / var.sum()),
            "reward_var": float(var.mean())}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--noise-level", type=float_above(0), default=0.3)
    p.add_argument("--num-prompts", type=int_in(1), default=16)
    p.add_argument("--prompt-seed", type=int_in(0, 2**62), default=3000)
    p.add_argument("--pairs", type=int_in(1), default=16, help="antithetic pairs per prompt")
    p.add_argument("--steps", type=int_in(2), default=10, help="the trainer's sampling steps")
    p.add_argument("--sde-steps", type=int_in(0), nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--seed", type=int_in(0, 2**62), default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON lines, one per SDE step")
    args = p.parse_args(argv)
    late = [s for s in args.sde_steps if s >= args.steps - 1]
    if late:
        p.error(f"--sde-steps: expected steps below --steps - 1 = {args.steps - 1}, got {late}")
    model, reward = models.load("tiny"), rewards.load("tiny")
    sigmas = flow_sigmas(args.steps, model.time_shift).tolist()
    prompts = sample_prompts(args.num_prompts, args.prompt_seed)
    rows = []
    for k in args.sde_steps:
        rows.append(odd_share(model, reward, prompts, sigmas, k, args.pairs, args.noise_level,
                              args.seed + k))  # fmt: skip
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"\nnoise level {args.noise_level:g}, {args.num_prompts} prompts (seed "
          f"{args.prompt_seed}) x {args.pairs} pairs, {args.steps} steps\n")  # fmt: skip
    print("| SDE step | odd share | pair / two draws (variance) | within-prompt reward var |\n"
          "|---:|---:|---:|---:|")  # fmt: skip
    for r in rows:
        print(f"| {r['sde_step']} | {r['odd_share']:.2f} | {2 * r['odd_share']:.2f} "
              f"| {r['reward_var']:.3f} |")  # fmt: skip
    if args.out is not None:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
