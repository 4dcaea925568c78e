"""Search variants against best-of-M at equal model calls, on the embedded model (issue 14).

For each variant (a guiding reward and a SearchConfig), :func:`compare_noise` runs the three
continuations of every prompt's rollout (random noise, best-of-M, the CEM search; best-of-M
and the search guided by the same reward, at the same K*N one-step-scored candidates). The
final images are then judged three ways, none of which the search needs to have seen:

* ``guided``: the guiding reward itself (what best-of-M and the search maximised);
* ``logprob``: the classifier's mean log-probability of the prompt's attributes (``tiny``);
* ``match``: the fraction of images whose three attributes the classifier reads right;
* ``judge``: the same fraction read by an independent judge (``--judge``, e.g. the analytic
  shapes judge built from the rendering rules), when one is given.

Each comparison is a paired t statistic over prompts (df = prompts - 1; for the match columns
on the per-prompt 0/1 outcomes). The lookahead variants (``look2``, ``look4``: each candidate
scored after m Euler steps to t = 0, ``SearchConfig.preview_steps``) spend the same 48
candidate forwards (m * K * N; guidance doubles each into two transformer rows) on fewer
candidates; their best-of-M looks ahead too. Rows keep every prompt's scores
(``per_prompt``), so :func:`versus` pairs a variant's searched images with another variant's
continuation on the same prompts and rollouts (e.g. the lookahead search against the one-step
``default`` best-of-48), printed as a second table when ``default`` ran too. One JSON line
per variant goes to ``--out`` and a markdown table is printed. Choose on development prompts
(one ``--prompt-seed``), confirm once on held-out prompts (another).

    python3 benchmarks/search_variants.py --prompt-seed 100 --num-prompts 128 --out dev.jsonl
    python3 benchmarks/search_variants.py --prompt-seed 200 --num-prompts 128 \\
        --variants default margin --out heldout.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from smartgrpo_fast import models, rewards
from smartgrpo_fast.search import RolloutConfig, SearchConfig, compare_noise, paired_stats
from smartgrpo_fast.shapes import sample_prompts

BASE = SearchConfig()
#: name -> (guiding reward, search config): every variant spends K*N = 48 candidates.
VARIANTS: dict[str, tuple[str, SearchConfig]] = {
    "default": ("tiny", BASE),
    "prob": ("tiny-prob", BASE),
    "min": ("tiny-min", BASE),
    "margin": ("tiny-margin", BASE),
    "margin-k8n6": ("tiny-margin", replace(BASE, k=8, rounds=6, top=2)),
    "margin-k24n2": ("tiny-margin", replace(BASE, k=24, rounds=2, top=6)),
    "margin-alpha0.5": ("tiny-margin", replace(BASE, alpha=0.5, min_sigma=0.3)),
    "margin-mean": ("tiny-margin", replace(BASE, use="mean")),
    # the lookahead preview at equal forwards: m * K * N = 48 candidate rows (issue 21)
    "look2": ("tiny", replace(BASE, k=8, rounds=3, top=2, preview_steps=2)),
    "look4": ("tiny", replace(BASE, k=4, rounds=3, top=1, preview_steps=4)),
}
KEYS = ("random", "bestof", "searched")


def judge_final_images(comp, classifier, judge) -> dict[str, dict[str, torch.Tensor]]:
    """Per continuation: (P,) classifier log-prob, (P,) classifier all-match, judge all-match."""
    out = {}
    for key in KEYS:
        images = getattr(comp, f"images_{key}")
        scores = {
            "logprob": classifier(images, comp.prompts).double().cpu(),
            "match": classifier.matches(images, comp.prompts).all(dim=1).double().cpu(),
        }
        if judge is not None:
            scores["judge"] = judge.matches(images, comp.prompts).all(dim=1).double().cpu()
        out[key] = scores
    return out


def run_variant(name: str, model, prompts, rollout, classifier, judge, images_dir=None) -> dict:
    guide, search = VARIANTS[name]
    t0 = time.perf_counter()
    comp = compare_noise(model, rewards.load(guide), prompts, search, rollout)
    seconds = time.perf_counter() - t0
    if images_dir is not None:  # to judge again later: {key: (P, 3, H, W) uint8}, prompts
        images = {k: (getattr(comp, f"images_{k}") * 255).round().to(torch.uint8) for k in KEYS}
        torch.save({"prompts": comp.prompts, **images}, images_dir / f"{name}.pt")
    scores = judge_final_images(comp, classifier, judge)
    for key in KEYS:
        scores[key]["guided"] = getattr(comp, f"reward_{key}").double().cpu()
    row = {"variant": name, "guide": guide, "search": asdict(search), "prompts": len(prompts),
           "calls_per_rollout": comp.calls, "seconds": seconds,
           "search_seconds": comp.seconds}  # fmt: skip
    for metric in scores["searched"]:
        row[metric] = _column({key: scores[key][metric] for key in KEYS})
    row["per_prompt"] = {key: {m: v.tolist() for m, v in scores[key].items()} for key in KEYS}
    return row


def versus(rows: list[dict], base: str = "default", against: str = "bestof") -> str:
    """A markdown table: each variant's searched images against ``base``'s ``against``
    continuation on the same prompts (means and paired t per metric), from ``per_prompt``."""
    ref = next((r for r in rows if r["variant"] == base and "per_prompt" in r), None)
    if ref is None:
        return ""
    metrics = [
        m for m in ("guided", "logprob", "match", "judge") if m in ref["per_prompt"][against]
    ]
    head = ["variant", "rows/rollout", *(f"{m}: s / {base} {against} (t)" for m in metrics)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "per_prompt" not in r:
            continue
        cells = [r["variant"], str(r["calls_per_rollout"]["searched"]["transformer_rows"])]
        for m in metrics:
            a = torch.tensor(r["per_prompt"]["searched"][m], dtype=torch.float64)
            b = torch.tensor(ref["per_prompt"][against][m], dtype=torch.float64)
            fmt = "{:.2f}" if m in ("match", "judge") else "{:.3f}"
            t = paired_stats(a, b)["t"]
            cells.append(f"{fmt.format(float(a.mean()))} / {fmt.format(float(b.mean()))} "
                         f"({t:.2f})")  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _column(per_key: dict[str, torch.Tensor]) -> dict[str, float]:
    """Means of a metric per continuation and the searched-vs-other paired t statistics."""
    col = {k: float(per_key[k].mean()) for k in KEYS}
    for other in ("bestof", "random"):
        col[f"t_vs_{other}"] = paired_stats(per_key["searched"], per_key[other])["t"]
    return col


def rejudge(rows: list[dict], images_dir: Path, judge) -> list[dict]:
    """Add the ``judge`` columns (and ``guided`` where missing) to rows run without them, from
    their saved final images (uint8: read quantised to 8 bits, as a PNG would hold them)."""
    out, guides = [], {}  # each guiding reward loaded once, however many rows it guided
    for row in rows:
        saved = torch.load(images_dir / f"{row['variant']}.pt")
        images = {k: saved[k].float() / 255 for k in KEYS}
        hits = {k: judge.matches(images[k], saved["prompts"]).all(dim=1).double() for k in KEYS}
        row = row | {"judge": _column(hits)}
        if "guided" not in row:
            if row["guide"] not in guides:
                guides[row["guide"]] = rewards.load(row["guide"])
            guide = guides[row["guide"]]
            row["guided"] = _column({k: guide(images[k], saved["prompts"]).double() for k in KEYS})
        out.append(row)
    return out


def table(rows: list[dict]) -> str:
    metrics = [m for m in ("guided", "logprob", "match", "judge") if m in rows[0]]
    head = ["variant", "guide", "K, N, T", "rows/rollout"]
    for m in metrics:
        head += [f"{m} rnd / bo / s", f"t vs bo ({m})"]
    head += ["s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        s = r["search"]
        knt = f"{s['k']}, {s['rounds']}, {s['top']}"
        if s.get("preview_steps", 1) > 1:
            knt += f", m={s['preview_steps']}"
        cells = [r["variant"], r["guide"], knt,
                 str(r["calls_per_rollout"]["searched"]["transformer_rows"])]  # fmt: skip
        for m in metrics:
            v = r[m]
            fmt = "{:.2f}" if m in ("match", "judge") else "{:.3f}"
            cells.append(" / ".join(fmt.format(v[k]) for k in KEYS))
            cells.append(f"{v['t_vs_bestof']:.2f}")
        cells.append(f"{r['seconds']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="variants to run (default: all)")  # fmt: skip
    p.add_argument("--num-prompts", type=int, default=128, help="prompts (default: 128)")
    p.add_argument("--prompt-seed", type=int, required=True,
                   help="sample_prompts seed: one for choosing, another for held-out")  # fmt: skip
    p.add_argument("--step", type=int, default=RolloutConfig().step,
                   help="the searched SDE step (default: %(default)s)")  # fmt: skip
    p.add_argument("--judge", default=None,
                   help="a reward with matches(): a second judge (default: none)")  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="JSON lines, one per variant")
    p.add_argument("--rejudge", type=Path, default=None, metavar="JSONL",
                   help="judge the rows of JSONL again with --judge, from --save-images DIR "
                        "(default: off; writes the rows with judge columns to --out)")  # fmt: skip
    p.add_argument("--save-images", type=Path, default=None, metavar="DIR",
                   help="save final images as DIR/VARIANT.pt (default: off)")  # fmt: skip
    args = p.parse_args(argv)
    if args.rejudge is not None:
        if args.judge is None or args.save_images is None:
            p.error("argument --rejudge: needs --judge and --save-images DIR")
        old = [json.loads(line) for line in args.rejudge.read_text().splitlines() if line]
        rows = rejudge(old, args.save_images, rewards.load(args.judge))
        args.out.write_text("".join(json.dumps(r | {"judge_name": args.judge}) + "\n"
                                    for r in rows))  # fmt: skip
        print(table(rows))
        return 0
    torch.manual_seed(0)
    model = models.load("tiny")
    classifier = rewards.load("tiny")
    judge = rewards.load(args.judge) if args.judge else None
    prompts = sample_prompts(args.num_prompts, args.prompt_seed)
    rollout = RolloutConfig(step=args.step)
    rows = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.save_images is not None:
        args.save_images.mkdir(parents=True, exist_ok=True)
    for name in args.variants:
        row = run_variant(name, model, prompts, rollout, classifier, judge, args.save_images)
        row |= {"prompt_seed": args.prompt_seed, "step": args.step, "judge_name": args.judge}
        rows.append(row)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{name}: {row['seconds']:.0f} s", file=sys.stderr)
    print(table(rows))
    cross = versus(rows)
    if cross:
        print("\nsearched against default's best-of-48 (same prompts and rollouts):\n" + cross)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
