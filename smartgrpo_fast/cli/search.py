"""``smartgrpo-fast search``: searched vs random vs best-of-M noise on the same rollouts."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from smartgrpo_fast import __version__
from smartgrpo_fast.cli import args as cli_args
from smartgrpo_fast.cli import build
from smartgrpo_fast.cli.args import int_in

__all__ = ["add_search"]


def _num(x: float | None, spec: str) -> str:
    """``x`` formatted, or ``n/a`` where result.json holds null (a std or t of one prompt, a
    mean of no finite reward)."""
    return "n/a" if x is None else format(x, spec)


def add_search(commands: argparse._SubParsersAction) -> None:
    """Register ``search`` on the top-level sub-command parser."""
    from smartgrpo_fast.search import RolloutConfig, SearchConfig
    from smartgrpo_fast.search.config import USES

    sd, rd = SearchConfig(), RolloutConfig()
    p = commands.add_parser(
        "search",
        help="searched vs random vs best-of-M noise on the same rollouts",
        description=(
            "For each prompt: one rollout from seeded initial noise, ODE steps down to SDE "
            "step --step, then three continuations of that step — plain random noise, the "
            "best of M = K*N one-step-scored random draws, and the CEM-searched noise — each "
            "finished by the ODE and scored by --reward. Writes DIR/result.json (config, "
            "prompts, reward_searched, reward_random, reward_bestof: one final reward per "
            "prompt in prompt order; summary with paired t statistics; rounds: per-round "
            "statistics; throughput; model_options), DIR/grid.png (random | best-of-M | "
            "searched per prompt) and DIR/rounds.png (the per-round reward curve)."
        ),
    )
    cli_args.add_model(p)
    cli_args.add_reward(p, " (e.g. 'imagereward:1,aesthetic:0.1')")
    cli_args.add_prompts(p, num_default=32, seed_flag="--seed")
    cli_args.add_cem(p, sd.k, sd.rounds, sd.top)
    p.add_argument("--use", choices=USES, default=sd.use,
                   help="noise the rollout takes: the final CEM mean, a draw from the final "
                        "N(mu, sigma^2), or the best candidate of any round "
                        "(default: %(default)s)")  # fmt: skip
    p.add_argument("--alpha", type=float, default=sd.alpha,
                   help="CEM smoothing in (0, 1], 1 = textbook (default: %(default)s)")  # fmt: skip
    p.add_argument("--min-sigma", type=float, default=sd.min_sigma,
                   help="floor of the CEM std (default: %(default)s)")  # fmt: skip
    p.add_argument("--pooled-sigma", action="store_true",
                   help="one CEM std per rollout (default: one per element)")  # fmt: skip
    p.add_argument("--rescale", action="store_true",
                   help="rescale the chosen noise to norm sqrt(D) (default: off)")  # fmt: skip
    p.add_argument("--decode-size", type=int_in(1), default=sd.decode_size, metavar="PX",
                   help="resize each decoded candidate to PX x PX before the reward (the "
                        "decode itself runs at the model's size; default: no resize, rewards "
                        "resize to their input size themselves)")  # fmt: skip
    p.add_argument("--preview-decoder", type=Path, default=None, metavar="DIR",
                   help="a local diffusers AutoencoderTiny folder (TAESD3) that decodes the "
                        "search's K*N one-step estimates instead of the VAE; the final images "
                        "still use the VAE (SD3 models; default: the VAE decodes all)")  # fmt: skip
    p.add_argument("--preview-steps", type=int_in(1), default=sd.preview_steps, metavar="M",
                   help="score each candidate on its estimate after M Euler steps to t = 0 "
                        "(a lookahead preview: M forwards per candidate; default: %(default)s, "
                        "the one-step estimate)")  # fmt: skip
    p.add_argument("--search-dtype", choices=("model", "float8"), default="model",
                   help="the transformer of the search's forwards: the model's own, or a "
                        "float8 copy (torchao, pip install 'smartgrpo-fast[fp8]'; CUDA, compute "
                        "capability >= 8.9; SD3 models); the rollouts' steps keep the model's "
                        "(default: %(default)s)")  # fmt: skip
    p.add_argument("--step", type=int_in(0), default=rd.step, metavar="S",
                   help="the searched SDE step, 0 <= S < --steps "
                        "(default: %(default)s)")  # fmt: skip
    p.add_argument("--steps", type=int_in(1), default=rd.steps, metavar="N",
                   help="sampling steps from t = 1 to 0 (default: %(default)s)")  # fmt: skip
    p.add_argument("--shift", type=float, default=None,
                   help="schedule time shift (default: the model's; 3 for tiny, SD3)")  # fmt: skip
    p.add_argument("--noise-level", type=float, default=rd.noise_level,
                   help="Flow-GRPO SDE noise level (default: %(default)s)")  # fmt: skip
    cli_args.add_batch(p, "rollouts searched together; a forward and a decode have B*K rows",
                       build.batch_rule())  # fmt: skip
    cli_args.add_seed(p, 0, "keys the prompts (tiny), initial noise, random noise and the search")
    cli_args.add_device(p)
    p.add_argument("--no-graph", action="store_true",
                   help="run rounds stage by stage even on CUDA (default: one captured CUDA "
                        "graph per round on CUDA)")  # fmt: skip
    cli_args.add_progress(p)
    cli_args.add_out(p, "search_out", "folder for result.json, grid.png, rounds.png")
    p.set_defaults(handler=_run_search, parser=p)


def _run_search(args: argparse.Namespace) -> int:
    from smartgrpo_fast.search import RolloutConfig, SearchConfig, compare_noise
    from smartgrpo_fast.search.report import (
        plot_rounds,
        prompt_match,
        result_dict,
        save_comparison_grid,
        write_result,
    )

    parser: argparse.ArgumentParser = args.parser
    device, dtype, prompts = build.inputs(args)
    try:
        search = SearchConfig(
            k=args.k, rounds=args.rounds, top=args.top, use=args.use, alpha=args.alpha,
            min_sigma=args.min_sigma, per_element=not args.pooled_sigma, rescale=args.rescale,
            seed=args.seed, graph=not args.no_graph, decode_size=args.decode_size,
            preview_steps=args.preview_steps,
        )  # fmt: skip
        rollout = RolloutConfig(steps=args.steps, step=args.step, shift=args.shift,
                                noise_level=args.noise_level, seed=args.seed)  # fmt: skip
    except ValueError as err:
        parser.error(str(err))
    reward = build.build_reward(args, device)
    if args.search_dtype != "model":
        if args.model == "tiny":
            parser.error("argument --search-dtype: float8 only for SD3 models")
        from smartgrpo_fast.models.fp8 import check_float8

        try:
            check_float8(device)  # before anything slow is loaded
        except RuntimeError as err:
            parser.error(f"argument --search-dtype: {build.one_line(err)}")
    model = build.load_model(args, device, dtype, preview_decoder=args.preview_decoder)
    scorer = model.for_search(args.search_dtype) if args.search_dtype != "model" else model
    batch = build.resolve_batch(args, model, device, k=search.k, default=rollout.batch)
    rollout = replace(rollout, batch=batch)
    print(f"{len(prompts)} prompts, K={search.k} N={search.rounds} T={search.top} B={batch} "
          f"use={search.use}, SDE step {rollout.step}/{rollout.steps}, reward {args.reward}, "
          f"{device}", file=sys.stderr)  # fmt: skip
    comp = compare_noise(model, reward, prompts, search, rollout, progress=not args.no_progress,
                         search_model=scorer)  # fmt: skip
    extra = {"version": __version__, "model_options": build.model_options(args, model, dtype)}
    if args.model == "tiny":  # the embedded world: which final images show their prompt
        from smartgrpo_fast import rewards

        extra["prompt_match"] = {
            "classifier": prompt_match(comp, rewards.load("tiny", device=device)),
            # from the rendering rules: a judge the search never sees (issue 14)
            "analytic": prompt_match(comp, rewards.load("shapes-judge")),
        }
    result = result_dict(comp, search, rollout, model=args.model, reward=args.reward,
                         device=device, extra=extra)  # fmt: skip
    out: Path = args.out
    json_path = write_result(result, out / "result.json")
    grid = save_comparison_grid(comp, out / "grid.png")
    try:
        curve = str(plot_rounds(comp, out / "rounds.png", reward=args.reward))
    except ImportError:
        curve = "rounds.png not drawn: matplotlib is missing (pip install 'smartgrpo-fast[bench]')"
    summ = result["summary"]
    for key in ("random", "bestof", "searched"):
        s = summ[key]
        print(f"final reward {key:>8}: {_num(s['mean'], '.4f')} ± {_num(s['std'], '.4f')}")
    for key in ("searched_vs_random", "searched_vs_bestof"):
        s = summ[key]
        diff, t = _num(s["mean_diff"], "+.4f"), _num(s["t"], ".2f")
        wins = _num(s["win_rate"], ".0%")
        print(f"{key}: mean diff {diff}, paired t = {t} (df {s['df']}), wins {wins}")
    for judge, rates in result.get("prompt_match", {}).items():
        shown = ", ".join(f"{k} {rates[k]['all']:.0%}" for k in ("random", "bestof", "searched"))
        print(f"prompt match ({judge}, all three attributes): {shown}")
    cps = result["throughput"]["candidates_per_second"]
    if cps:
        print(f"search: {cps:.0f} candidates/s")
    print(f"JSON: {json_path}\nPNG:  {grid}\nPNG:  {curve}")
    return 0
