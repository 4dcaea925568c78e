"""How much of one GRPO step's policy gradient is signal, and how many rollouts a step needs.

At fixed weights, the trainer's rollouts of S optimizer steps (other prompts, other noise) each
give a batch gradient ``g_s = mu + n_s`` of the GRPO loss on the trainable parameters (what
``GRPOTrainer.update`` would clip and apply). Independent noises make the mean of the
off-diagonal inner products an unbiased estimate of ``|mu|^2``; the mean squared norm minus it,
of the noise ``E|n|^2``. A batch of B rollouts has noise ``E|n|^2 ~ 1/B``, so the batch whose
signal equals its noise has ``B * E|n|^2 / |mu|^2`` rollouts. Printed per noise strategy, with
the mean cosine between batch gradients (0: the steps' directions are unrelated).

    python3 benchmarks/grad_snr.py --batches 8 --noise random,smart --out snr.jsonl
    python3 benchmarks/grad_snr.py --batches 8 --noise random sample.noise_level=0.3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from smartgrpo_fast.cli.args import int_in
from smartgrpo_fast.train.config import NOISE_STRATEGIES, load_config
from smartgrpo_fast.train.trainer import GRPOTrainer


def batch_gradients(trainer: GRPOTrainer, batches: int) -> torch.Tensor:
    """(S, P) float64: the gradient of each of optimizer steps 1..S's rollouts at the
    trainer's current weights (no optimizer step is taken)."""
    grads = []
    for step in range(1, batches + 1):
        ro = trainer.rollouts(step)
        trainer.backward(ro, trainer.advantages(ro.rewards, ro.groups).values.to(trainer.device))
        # no gradient when every advantage is 0 (the trainer drops those rows): a zero one
        grads.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p))
                                .detach().flatten().double() for p in trainer.params]))  # fmt: skip
    return torch.stack(grads)


def signal_and_noise(grads: torch.Tensor, rollouts_per_batch: int) -> dict[str, float]:
    """Estimates from (S, P) independent batch gradients, S >= 2 (module docstring)."""
    s = grads.shape[0]
    if s < 2:
        raise ValueError(f"grads: expected at least 2 batch gradients, got {tuple(grads.shape)}")
    gram = grads @ grads.T
    off = ~torch.eye(s, dtype=torch.bool)
    signal = float(gram[off].mean())
    # jackknife (leave one batch out) standard error of the signal estimate
    loo = torch.stack([gram[keep][:, keep][off[: s - 1, : s - 1]].mean()
                       for keep in (torch.arange(s) != i for i in range(s))])  # fmt: skip
    signal_se = float(((s - 1) / s * ((loo - loo.mean()) ** 2).sum()).sqrt())
    total = float(gram.diagonal().mean())
    unit = grads / grads.norm(dim=1, keepdim=True).clamp_min(1e-300)
    cos = float((unit @ unit.T)[off].mean())
    noise = total - signal
    needed = rollouts_per_batch * noise / signal if signal > 0 else float("inf")
    return {"signal_sq": signal, "signal_sq_se": signal_se, "noise_sq": noise, "mean_cos": cos,
            "rollouts_for_snr_1": needed, "grad_norm": total**0.5}  # fmt: skip


def _strategies(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",")]
    bad = [n for n in names if n not in NOISE_STRATEGIES]
    if bad:
        raise argparse.ArgumentTypeError(
            f"expected names from {', '.join(NOISE_STRATEGIES)}, got {bad} in {text!r}"
        )
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny", help="a shipped config or a YAML file")
    p.add_argument("--noise", type=_strategies, default=["random", "smart"],
                   help="comma-separated strategies (default: random,smart)")  # fmt: skip
    p.add_argument("--batches", type=int_in(2), default=8, help="optimizer steps' rollouts, S")
    p.add_argument("--out", type=Path, default=None, help="JSON lines, one per noise")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    args = p.parse_args(argv)
    rows = []
    for noise in args.noise:
        cfg = load_config(args.config, [*args.overrides, f"noise={noise}", "log.progress=false"])
        rollouts = cfg.sample.prompts_per_step * cfg.sample.group_size
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            trainer = GRPOTrainer(cfg, Path(tmp) / "run")
            try:
                grads = batch_gradients(trainer, args.batches)
            finally:
                trainer.close()
        rows.append({"noise": noise, "rollouts_per_batch": rollouts, "batches": args.batches,
                     **signal_and_noise(grads, rollouts),
                     "seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    over = " ".join(args.overrides) or "none"
    print(f"\nconfig {args.config}, overrides: {over}; {args.batches} batches per noise\n")
    print("| noise | rollouts per batch | mean cos | ‖mu‖² / E‖n‖² of a batch (± 1 s.e.) "
          "| rollouts for signal = noise |\n|---|---:|---:|---:|---:|")  # fmt: skip
    for r in rows:
        n2 = r["noise_sq"] if r["noise_sq"] > 0 else float("nan")
        print(
            f"| {r['noise']} | {r['rollouts_per_batch']} | {r['mean_cos']:.3f} | "
            f"{r['signal_sq'] / n2:.4f} ± {r['signal_sq_se'] / n2:.4f} | "
            f"{r['rollouts_for_snr_1']:,.0f} |"
        )
    if args.out is not None:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
