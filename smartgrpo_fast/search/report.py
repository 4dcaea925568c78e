"""What ``smartgrpo-fast search`` writes: result.json, an image grid and the round curve."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from smartgrpo_fast.search.config import RoundStats, SearchConfig
from smartgrpo_fast.search.rollout import Comparison, RolloutConfig, paired_stats

__all__ = ["plot_rounds", "result_dict", "save_comparison_grid", "write_result"]

COLUMNS = (("random", "random eps"), ("bestof", "best-of-M"), ("searched", "searched eps*"))


def _summary(x: torch.Tensor) -> dict[str, float]:
    x = x.double()
    return {"mean": float(x.mean()), "std": float(x.std()) if x.numel() > 1 else float("nan")}


def _finite(x: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def _round_means(stats: RoundStats) -> list[dict[str, float]]:
    return [
        {"round": i + 1, "best": float(stats.best[i].nanmean()),
         "elite_mean": float(stats.elite_mean[i].nanmean()), "mean": float(stats.mean[i].nanmean()),
         "nan_count": int(stats.nan_count[i].sum())}
        for i in range(stats.best.shape[0])
    ]  # fmt: skip


def result_dict(
    comp: Comparison,
    search: SearchConfig,
    rollout: RolloutConfig,
    *,
    model: str,
    reward: str,
    device: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything result.json holds (see the CLI's --help)."""
    n = len(comp.prompts)
    calls = n * comp.candidates
    return _finite({
        "config": {"search": asdict(search), "rollout": {**asdict(rollout), "shift": comp.shift},
                   "model": model, "reward": reward, "device": device},
        "prompts": comp.prompts,
        "reward_searched": comp.reward_searched.tolist(),
        "reward_random": comp.reward_random.tolist(),
        "reward_bestof": comp.reward_bestof.tolist(),
        "summary": {
            "searched": _summary(comp.reward_searched),
            "random": _summary(comp.reward_random),
            "bestof": _summary(comp.reward_bestof),
            "searched_vs_random": paired_stats(comp.reward_searched, comp.reward_random),
            "searched_vs_bestof": paired_stats(comp.reward_searched, comp.reward_bestof),
            "bestof_vs_random": paired_stats(comp.reward_bestof, comp.reward_random),
        },
        "rounds": {"searched": _round_means(comp.rounds),
                   "bestof": _round_means(comp.rounds_bestof),
                   "per_prompt": comp.rounds.as_dict()},
        "model_calls": {"per_rollout": comp.calls,
                        "total": {k: {q: v * n for q, v in c.items()}
                                  for k, c in comp.calls.items()}},
        "throughput": {
            "candidates_per_rollout": comp.candidates,
            "search_seconds": comp.seconds.get("searched"),
            "bestof_seconds": comp.seconds.get("bestof"),
            "candidates_per_second": calls / comp.seconds["searched"]
            if comp.seconds.get("searched") else None,
        },
        **(extra or {}),
    })  # fmt: skip


#: The attributes a ``matches`` judge reads, in its columns' order (the embedded classifier).
MATCH_ATTRIBUTES = ("shape", "color", "background")


def prompt_match(comp: Comparison, judge: Any) -> dict[str, dict[str, float]]:
    """Per continuation (random, bestof, searched), the fraction of final images whose
    attributes ``judge.matches(images, prompts) -> (N, 3) bool`` reads as the prompt's: one
    rate per attribute and ``all`` (every attribute). For the embedded model's classifier."""
    out = {}
    for key, _ in COLUMNS:
        hits = judge.matches(getattr(comp, f"images_{key}"), comp.prompts).detach().cpu()
        if hits.shape != (len(comp.prompts), len(MATCH_ATTRIBUTES)):
            raise ValueError(
                f"judge.matches: expected a ({len(comp.prompts)}, {len(MATCH_ATTRIBUTES)}) "
                f"bool tensor, got shape {tuple(hits.shape)}"
            )
        rates = hits.double().mean(0).tolist()
        out[key] = dict(zip(MATCH_ATTRIBUTES, rates, strict=True))
        out[key]["all"] = float(hits.all(dim=1).double().mean())
    return out


def write_result(result: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


def save_comparison_grid(
    comp: Comparison, path: str | Path, *, cell: int = 128, max_rows: int | None = 32
) -> Path:
    """PNG: one row per prompt (at most ``max_rows``), columns random | best-of-M | searched,
    each tile captioned with its final reward."""
    from PIL import Image, ImageDraw

    rows = len(comp.prompts) if max_rows is None else min(max_rows, len(comp.prompts))
    label_w, pad, head, caption = 300, 6, 20, 14
    w = label_w + len(COLUMNS) * (cell + pad)
    h = head + rows * (cell + caption + pad)
    canvas = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(canvas)
    for j, (_, title) in enumerate(COLUMNS):
        draw.text((label_w + j * (cell + pad) + 4, 4), title, fill="black")
    for i in range(rows):
        y = head + i * (cell + caption + pad)
        draw.text((4, y + cell // 2 - 6), comp.prompts[i][:48], fill="black")
        for j, (key, _) in enumerate(COLUMNS):
            img = getattr(comp, f"images_{key}")[i].detach().cpu()
            r = float(getattr(comp, f"reward_{key}")[i])
            px = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            tile = Image.fromarray(px)
            resample = Image.NEAREST if tile.width < cell else Image.BICUBIC
            x = label_w + j * (cell + pad)
            canvas.paste(tile.resize((cell, cell), resample), (x, y))
            draw.text((x + 2, y + cell + 1), f"r = {r:.3f}", fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def plot_rounds(comp: Comparison, path: str | Path, *, reward: str = "reward") -> Path:
    """PNG: per-round one-step rewards (mean over prompts, band = ±1 std) of the CEM search
    (best, elite mean, population mean) and of best-of-M (running best), with the final
    rewards of the three continuations as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    n_rounds = comp.rounds.best.shape[0]
    x = torch.arange(1, n_rounds + 1).numpy()
    series = [
        ("CEM best", comp.rounds.best, "C0", "-"),
        ("CEM elite mean", comp.rounds.elite_mean, "C0", "--"),
        ("CEM population mean", comp.rounds.mean, "C0", ":"),
        ("best-of-M running best", torch.cummax(comp.rounds_bestof.best.nan_to_num(-1e30), 0)
         .values, "C1", "-"),
    ]  # fmt: skip
    for label, data, color, style in series:
        d = data.detach().cpu().double()
        # one prompt has no spread: no band (std of one value warns and is NaN)
        std = d.std(1).nan_to_num(0) if d.shape[1] > 1 else torch.zeros(d.shape[0])
        mean, std = d.nanmean(1).numpy(), std.numpy()
        ax.plot(x, mean, style, color=color, marker="o", label=label)
        if style == "-":
            ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.12)
    for key, color in (("random", "C3"), ("bestof", "C1"), ("searched", "C0")):
        final = float(getattr(comp, f"reward_{key}").double().mean())
        ax.axhline(final, color=color, lw=0.8, alpha=0.7, ls="-.", label=f"final: {key}")
    ax.set_xlabel("round")
    ax.set_ylabel(f"{reward} (one-step estimate; dash-dot: final image)")
    ax.set_xticks(x)
    ax.set_title(f"Noise search, {len(comp.prompts)} prompts, K·N = {comp.candidates}")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
