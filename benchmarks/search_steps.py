"""Which SDE steps of a window does the search pay off on? Final rewards of a trainer's rollouts.

A GRPO step with ``noise: smart`` searches every SDE step of its window (``sample.search_steps``
null) or only ``n`` of them, the window's first or last (``sample.search_steps_at``: ``start``
or ``end``; the others take their random draw). At fixed weights (no update), this samples the
same S optimizer steps' rollouts under each variant: ``random`` (plain Flow-GRPO), ``smart``
with every SDE step searched, and ``smart`` with the first ``n`` and with the last ``n``
searched, for each ``n`` below the window's size. Prompts, x_T,
windows and every random draw are keyed by (seed, step, row), so the variants' rollouts are
paired row by row. Printed per variant: the model rows a rollout made, the mean final reward on
the run's reward, and the paired difference (mean, t over the rollouts, share of rows that
gain) against ``random`` and against searching every step.

    python3 benchmarks/search_steps.py --batches 8 --out search_steps.json \\
        sample.sde_window_size=2 seed=2000
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from smartgrpo_fast.cli.args import int_in
from smartgrpo_fast.train.config import load_config
from smartgrpo_fast.train.trainer import GRPOTrainer


def variants(window: int) -> list[tuple[str, list[str]]]:
    """(name, overrides) of each variant for a window of ``window`` SDE steps."""
    out = [("random", ["noise=random"]), ("smart, every SDE step", ["noise=smart"])]
    for at, word in (("start", "first"), ("end", "last")):
        out += [(f"smart, {word} {n} of {window}",
                 ["noise=smart", f"sample.search_steps={n}", f"sample.search_steps_at={at}"])
                for n in range(1, window)]  # fmt: skip
    return out


def final_rewards(trainer: GRPOTrainer, batches: int) -> tuple[torch.Tensor, float]:
    """(S * R,) float64 final rewards of optimizer steps 1..S's rollouts at the trainer's
    weights, and the model rows a rollout made (mean over the steps)."""
    rewards, calls = [], []
    for step in range(1, batches + 1):
        ro = trainer.rollouts(step)
        rewards.append(ro.rewards.detach().double().cpu())
        calls.append(float(ro.model_calls))
    return torch.cat(rewards), sum(calls) / len(calls)


def paired(a: torch.Tensor, b: torch.Tensor) -> dict[str, float | int | None]:
    """Mean of ``a - b`` over the rows where both are finite, its paired t and the share of
    rows where ``a > b`` (ties count half)."""
    keep = torch.isfinite(a) & torch.isfinite(b)
    d = (a - b)[keep]
    n = int(d.numel())
    sd = float(d.std()) if n > 1 else float("nan")
    t = float(d.mean()) / (sd / math.sqrt(n)) if n > 1 and sd > 0 else None
    wins = float(((d > 0).double() + 0.5 * (d == 0).double()).mean()) if n else None
    return {"n": n, "mean_diff": float(d.mean()) if n else None, "t": t, "win_rate": wins}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny", help="a shipped config or a YAML file")
    p.add_argument("--batches", type=int_in(1), default=8, help="optimizer steps' rollouts, S")
    p.add_argument("--out", type=Path, default=None, help="a JSON file of the results")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    args = p.parse_args(argv)
    base = load_config(args.config, args.overrides)
    window = base.sample.sde_window_size
    if window < 2:
        p.error(f"the window has {window} SDE step: give sample.sde_window_size=2 or more")
    rows, rewards = [], {}
    for name, extra in variants(window):
        cfg = load_config(args.config, [*args.overrides, *extra, "log.progress=false"])
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            trainer = GRPOTrainer(cfg, Path(tmp) / "run")
            try:
                r, calls = final_rewards(trainer, args.batches)
            finally:
                trainer.close()
        rewards[name] = r
        finite = r[torch.isfinite(r)]
        rows.append({"variant": name, "model_rows_per_rollout": calls, "rollouts": int(r.numel()),
                     "reward_mean": float(finite.mean()), "reward_std": float(finite.std()),
                     "seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    every = "smart, every SDE step"
    for row in rows:
        r = rewards[row["variant"]]
        row["vs_random"] = paired(r, rewards["random"])
        row["vs_every_step"] = paired(r, rewards[every])
    over = " ".join(args.overrides) or "none"
    print(f"\nconfig {args.config} ({base.reward}), overrides: {over}; {args.batches} steps' "
          f"rollouts per variant, paired by row\n")  # fmt: skip
    print("| variant | model rows a rollout | final reward | vs random: diff (t, wins) "
          "| vs every step searched: diff (t, wins) |\n|---|---:|---:|---:|---:|")  # fmt: skip

    def cell(s: dict) -> str:
        if s["mean_diff"] is None or s["t"] is None:
            return "—"
        return f"{s['mean_diff']:+.4f} ({s['t']:.2f}, {s['win_rate']:.0%})"

    for row in rows:
        print(f"| {row['variant']} | {row['model_rows_per_rollout']:g} | "
              f"{row['reward_mean']:.4f} | {cell(row['vs_random'])} | "
              f"{cell(row['vs_every_step'])} |")  # fmt: skip
    if args.out is not None:
        args.out.write_text(json.dumps({"config": args.config, "overrides": args.overrides,
                                        "batches": args.batches, "variants": rows},
                                       indent=1) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
