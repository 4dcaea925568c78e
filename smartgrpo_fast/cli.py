"""The ``smartgrpo-fast`` command line: a thin layer over the library's configs.

Commands:

* ``smartgrpo-fast bench ops``: time the fused ops on each backend against unfused PyTorch
  (:mod:`smartgrpo_fast.bench.ops`); prints a table and writes CSV, JSON and a PNG plot.
* ``smartgrpo-fast bench velocity``: the batched velocity, eager vs CUDA graph vs compile.
* ``smartgrpo-fast grid``: an image grid of the embedded model.
* ``smartgrpo-fast search``: searched vs random vs best-of-M noise on the same rollouts;
  writes result.json, an image grid and the per-round reward curve
  (:mod:`smartgrpo_fast.search`).
* ``smartgrpo-fast eval``: the mean reward of a model, or of its LoRA adapter against the base
  model (paired), on fresh prompts; writes result.json and an image grid
  (:mod:`smartgrpo_fast.train.evaluate`).
* ``smartgrpo-fast plot``: training curves of runs against steps and wall time
  (:mod:`smartgrpo_fast.train.plot`).
* ``smartgrpo-fast --version``.

``python -m smartgrpo_fast`` runs the same :func:`main`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from smartgrpo_fast import __version__
from smartgrpo_fast.bench import ops as bench_ops

__all__ = ["build_parser", "main"]

_PROG = "smartgrpo-fast"
_SUFFIXES = {"K": 2**10, "M": 2**20, "G": 2**30}


def _size(text: str) -> int:
    """argparse type of --sizes: an int >= 256 (K·D elements), or with a binary suffix K, M, G
    (``64K`` = 65536, ``1M`` = 1048576)."""
    cleaned = text.strip().upper()
    factor = _SUFFIXES.get(cleaned[-1:], 1)
    digits = cleaned[:-1] if factor > 1 else cleaned
    try:
        value = int(digits) * factor
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of elements such as 65536 or 64K, got {text!r}"
        ) from None
    if value < bench_ops.MIN_SIZE:
        raise argparse.ArgumentTypeError(
            f"expected at least {bench_ops.MIN_SIZE} elements (16 candidates of a (16, 1, 1) "
            f"latent), got {text!r}"
        )
    return value


def _int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """argparse type: an int in [lo, hi) (no upper bound when ``hi`` is None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo or (hi is not None and value >= hi):
            bound = f">= {lo}" if hi is None else f"in [{lo}, {hi})"
            raise argparse.ArgumentTypeError(f"expected an integer {bound}, got {text!r}")
        return value

    return parse


def _device(text: str) -> str:
    """argparse type of --device: cpu, cuda or cuda:N."""
    name = text.strip().lower()
    head, _, index = name.partition(":")
    if name == "cpu" or (head == "cuda" and (not index or index.isdigit())):
        return name
    raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")


def _add_bench_ops(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ops",
        help="time the fused ops against unfused PyTorch",
        description=(
            "Time each fused op (sample_perturb, x0_estimate, topk_select, cem_update) on each "
            "backend provider (cpp, reference, triton, cuda: SMARTGRPO_BACKEND set to it) "
            "against the unfused PyTorch a user would write, at sizes of K·D elements (B = 1 "
            "row, K candidates of a (16, H, W) latent). Prints a table with every speedup of "
            "the run and writes one row per measurement to CSV and JSON, plus a PNG plot drawn "
            "from the CSV."
        ),
    )
    p.add_argument(
        "--ops",
        nargs="+",
        choices=bench_ops.OPS,
        default=list(bench_ops.OPS),
        metavar="OP",
        help=f"ops to time, from: {', '.join(bench_ops.OPS)} (default: all)",
    )
    p.add_argument(
        "--providers",
        nargs="+",
        choices=bench_ops.PROVIDERS,
        default=None,
        metavar="P",
        help=f"providers to time, from: {', '.join(bench_ops.PROVIDERS)} (default: "
        f"{' '.join(bench_ops.CPU_PROVIDERS)} on CPU, {' '.join(bench_ops.CUDA_PROVIDERS)} on "
        "CUDA, less those that cannot run here)",
    )
    p.add_argument(
        "--sizes",
        nargs="+",
        type=_size,
        default=None,
        metavar="N",
        help="K·D element counts, each >= 256; suffixes K, M, G are powers of 2 "
        "(default: 64K 256K 1M 4M 16M on CPU, 1M 4M 16M 64M on CUDA)",
    )
    p.add_argument(
        "--dtype",
        choices=tuple(bench_ops.DTYPES),
        default="float32",
        help="storage dtype of the latents; rewards, mu and sigma stay float32 "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--device",
        type=_device,
        default=None,
        help="cpu, cuda or cuda:N (default: cuda if available, else cpu)",
    )
    p.add_argument(
        "--repeats",
        type=_int_in(1),
        default=None,
        metavar="N",
        help="timed calls per measurement (default: 10 on CPU, 100 on CUDA)",
    )
    p.add_argument(
        "--warmup",
        type=_int_in(0),
        default=None,
        metavar="N",
        help="untimed calls before them (default: 2 on CPU, 10 on CUDA)",
    )
    p.add_argument(
        "--seed",
        type=_int_in(0, 2**63),
        default=0,
        help="seed of the inputs and the noise (default: %(default)s)",
    )
    p.add_argument(
        "--validate",
        action="store_true",
        help="call the fused ops with validate=True (value checks, which sync CUDA)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("bench_out"),
        metavar="DIR",
        help="output directory (default: %(default)s)",
    )
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(handler=_run_bench_ops, parser=p)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``smartgrpo-fast``."""
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Fast Smart-GRPO: fused ops and CEM noise search for flow-matching models.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    bench = commands.add_parser(
        "bench",
        help="run a benchmark",
        description="Run a benchmark and write its results (CSV, JSON, PNG) to --out.",
    )
    targets = bench.add_subparsers(dest="target", metavar="TARGET", required=True)
    _add_bench_ops(targets)
    _add_bench_velocity(targets)
    _add_bench_search(targets)
    from smartgrpo_fast.bench.train import add_bench_train

    add_bench_train(targets)
    _add_grid(commands)
    _add_search(commands)
    _add_eval(commands)
    _add_plot(commands)
    from smartgrpo_fast.train.cli import add_train_command

    add_train_command(commands)
    return parser


def _add_bench_velocity(sub: argparse._SubParsersAction) -> None:
    from smartgrpo_fast.graphs import BACKENDS

    p = sub.add_parser(
        "velocity",
        help="time the batched K-candidate velocity: eager vs CUDA graph vs torch.compile",
        description=(
            "Time SD3FlowModel.velocity on N = B*K latents with each backend on the same call: "
            "eager, graph (CUDA graphs per batch bucket; eager with a warning off CUDA), "
            "compile-reduce-overhead, compile-max-autotune. Models: tiny (random tiny SD3), "
            "sd35-medium (the full-size transformer with random weights, at 512 px), or a "
            "StableDiffusion3Pipeline folder. Writes velocity_*.csv/json and prints a table."
        ),
    )
    p.add_argument("--model", default="tiny", help="tiny, sd35-medium or a folder (default: tiny)")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=["eager", "graph"])
    p.add_argument("--batches", nargs="+", type=_int_in(1), default=[1, 4, 16], metavar="N")
    p.add_argument(
        "--dtype",
        choices=tuple(bench_ops.DTYPES),
        default=None,
        help="transformer dtype (default: bfloat16 on CUDA, float32 on CPU)",
    )
    p.add_argument("--device", type=_device, default=None)
    p.add_argument("--repeats", type=_int_in(1), default=10, metavar="N")
    p.add_argument("--warmup", type=_int_in(1), default=3, metavar="N")
    p.add_argument("--out", type=Path, default=Path("bench_out"), metavar="DIR")
    p.set_defaults(handler=_run_bench_velocity, parser=p)


def _run_bench_velocity(args: argparse.Namespace) -> int:
    from smartgrpo_fast.bench import velocity

    device = args.device or _default_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        args.parser.error(f"argument --device: {device!r} requested but CUDA is not available")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    try:
        cfg = velocity.VelocityBenchConfig(
            model=args.model,
            batches=tuple(dict.fromkeys(args.batches)),
            backends=tuple(dict.fromkeys(args.backends)),
            dtype=dtype,
            device=device,
            repeats=args.repeats,
            warmup=args.warmup,
        )
    except ValueError as err:
        args.parser.error(str(err))
    rows = velocity.run(cfg)
    stem = args.out / f"velocity_{Path(args.model).name}_{device.replace(':', '')}_{dtype}"
    csv_path = bench_ops.write_csv(rows, stem.with_suffix(".csv"))
    json_path = bench_ops.write_json(rows, stem.with_suffix(".json"))
    first = rows[0]
    print(f"velocity of {args.model} on {first['device_name']} ({device}), {dtype}, "
          f"torch {first['torch_version']}, commit {first['git_commit']}")  # fmt: skip
    print(velocity.format_velocity_table(rows))
    print(f"\nCSV:  {csv_path}\nJSON: {json_path}")
    return 0


def _add_bench_search(sub: argparse._SubParsersAction) -> None:
    from smartgrpo_fast.bench.search import MODELS, PROVIDERS, SearchBenchConfig

    d = SearchBenchConfig()
    p = sub.add_parser(
        "search",
        help="time one whole noise search: naive reference vs fused vs whole-round CUDA graph",
        description=(
            "Time one search of B rollouts (K candidates, N rounds, T elites) per provider: "
            "reference (naive: torch.randn noise, unfused, Python loop), fused (NoiseSearch "
            "stage by stage), graph (one captured round replayed N times; CUDA). Models: tiny "
            "(embedded), sd3-tiny (tiny random SD3 pipeline), sd35-medium (full-size random "
            "SD3.5-medium at 512 px; GPU). Also splits a round of reference and fused into its "
            "stages (sample, forward, x0, decode, reward, select/update; a device synchronize "
            "and a timer around each) and measures each provider's peak memory (CUDA: "
            "max_memory_allocated; CPU: the process's peak RSS). Writes search_*.csv/json, "
            "a stacked-bar plot search_*_stages.png, and prints candidates/s and the split."
        ),
    )
    p.add_argument("--model", choices=MODELS, default=d.model)
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=None,
                   help="default: reference fused (+ graph on CUDA)")  # fmt: skip
    p.add_argument("--batch", type=_int_in(1), default=d.batch, metavar="B")
    p.add_argument("--k", type=_int_in(1), default=d.k)
    p.add_argument("--rounds", type=_int_in(1), default=d.rounds)
    p.add_argument("--top", type=_int_in(1), default=d.top)
    p.add_argument("--dtype", choices=tuple(bench_ops.DTYPES), default=None,
                   help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")  # fmt: skip
    p.add_argument("--device", type=_device, default=None)
    p.add_argument("--repeats", type=_int_in(1), default=d.repeats, metavar="N")
    p.add_argument("--warmup", type=_int_in(0), default=d.warmup, metavar="N")
    p.add_argument("--out", type=Path, default=Path("bench_out"), metavar="DIR")
    p.add_argument("--no-plot", action="store_true",
                   help="do not draw the stage split's PNG (default: drawn)")  # fmt: skip
    p.set_defaults(handler=_run_bench_search, parser=p)


def _run_bench_search(args: argparse.Namespace) -> int:
    from smartgrpo_fast.bench import search

    device = args.device or _default_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        args.parser.error(f"argument --device: {device!r} requested but CUDA is not available")
    cuda = device.startswith("cuda")
    providers = args.providers or (
        ("reference", "fused", "graph") if cuda else ("reference", "fused")
    )
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    try:
        cfg = search.SearchBenchConfig(
            model=args.model, providers=tuple(dict.fromkeys(providers)), batch=args.batch,
            k=args.k, rounds=args.rounds, top=args.top, dtype=dtype, device=device,
            repeats=args.repeats, warmup=args.warmup,
        )  # fmt: skip
    except ValueError as err:
        args.parser.error(str(err))
    rows = search.run(cfg)
    stem = args.out / f"search_{args.model}_{device.replace(':', '')}_{dtype}"
    csv_path = bench_ops.write_csv(rows, stem.with_suffix(".csv"))
    json_path = bench_ops.write_json(rows, stem.with_suffix(".json"))
    first = rows[0]
    print(f"search of {args.model} on {first['device_name']} ({device}), {dtype}, B={cfg.batch} "
          f"K={cfg.k} N={cfg.rounds} T={cfg.top}, torch {first['torch_version']}, "
          f"commit {first['git_commit']}")  # fmt: skip
    print(search.format_search_table(rows))
    print(f"\nCSV:  {csv_path}\nJSON: {json_path}")
    if not args.no_plot and any(r["metric"] == "stage_time" for r in rows):
        try:
            png_path = search.plot_stage_split(csv_path, stem.with_name(stem.name + "_stages.png"))
        except ImportError as err:
            print(f"plot skipped: {err} (pip install 'smartgrpo-fast[bench]')", file=sys.stderr)
        else:
            print(f"PNG:  {png_path}")
    return 0


def _add_grid(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "grid",
        help="image grid of the embedded model (prompts x seeds)",
        description="Sample the embedded model with the ODE and write a prompts x seeds PNG.",
    )
    p.add_argument("--prompts", type=_int_in(1), default=6, metavar="N",
                   help="number of sampled prompts (default: %(default)s)")  # fmt: skip
    p.add_argument("--prompt-seed", type=_int_in(0), default=0, metavar="S")
    p.add_argument("--seeds", type=_int_in(1), default=6, metavar="N",
                   help="initial noises per prompt (default: %(default)s)")  # fmt: skip
    p.add_argument("--steps", type=_int_in(1), default=40, metavar="N",
                   help="ODE steps (default: %(default)s)")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("tiny_grid.png"), metavar="PNG")
    p.set_defaults(handler=_run_grid, parser=p)


def _run_grid(args: argparse.Namespace) -> int:
    from smartgrpo_fast.models.tiny.grid import main as grid_main

    return grid_main(
        ["--prompts", str(args.prompts), "--prompt-seed", str(args.prompt_seed),
         "--seeds", str(args.seeds), "--steps", str(args.steps), "--out", str(args.out)]
    )  # fmt: skip


DEMO_REWARD = "tiny"


def _add_search(commands: argparse._SubParsersAction) -> None:
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
            "statistics; throughput), DIR/grid.png (random | best-of-M | searched per prompt) "
            "and DIR/rounds.png (the per-round reward curve)."
        ),
    )
    p.add_argument("--model", default="tiny",
                   help="tiny (embedded) or a StableDiffusion3Pipeline folder / cached repo id "
                        "(default: %(default)s)")  # fmt: skip
    p.add_argument("--reward", default=DEMO_REWARD, metavar="NAME[:WEIGHT],...",
                   help="reward, or a weighted sum of rewards by name (e.g. "
                        "'imagereward:1,aesthetic:0.1'); names: see smartgrpo_fast.rewards.NAMES "
                        "(default: %(default)s)")  # fmt: skip
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", metavar="TEXT",
                     help="a prompt (repeatable)")  # fmt: skip
    src.add_argument(
        "--prompts",
        type=Path,
        metavar="FILE",
        help="a text file, one prompt per line (blank lines and #-comments skipped)",
    )
    src.add_argument("--num-prompts", type=_int_in(1), default=32, metavar="N",
                     help="with --model tiny and no prompts given: N prompts sampled from the "
                          "embedded world with --seed (default: %(default)s)")  # fmt: skip
    p.add_argument("--k", type=_int_in(1), default=sd.k,
                   help="candidates per round (K; default: %(default)s)")  # fmt: skip
    p.add_argument("--rounds", type=_int_in(1), default=sd.rounds,
                   help="CEM rounds (N; default: %(default)s)")  # fmt: skip
    p.add_argument("--top", type=_int_in(1), default=sd.top,
                   help="elites per round (T <= K; default: %(default)s)")  # fmt: skip
    p.add_argument("--use", choices=USES, default=sd.use,
                   help="noise the rollout takes: the final CEM mean, a draw from the final "
                        "N(mu, sigma^2), or the best candidate of any round "
                        "(default: %(default)s)")  # fmt: skip
    p.add_argument("--alpha", type=float, default=sd.alpha,
                   help="CEM smoothing in (0, 1], 1 = textbook (default: %(default)s)")  # fmt: skip
    p.add_argument("--min-sigma", type=float, default=sd.min_sigma,
                   help="floor of the CEM std (default: %(default)s)")  # fmt: skip
    p.add_argument("--pooled-sigma", action="store_true",
                   help="one CEM std per rollout instead of one per element")  # fmt: skip
    p.add_argument("--rescale", action="store_true",
                   help="rescale the chosen noise to norm sqrt(D)")  # fmt: skip
    p.add_argument(
        "--step",
        type=_int_in(0),
        default=rd.step,
        metavar="S",
        help="the searched SDE step, 0 <= S < --steps (default: %(default)s)",
    )
    p.add_argument(
        "--steps",
        type=_int_in(1),
        default=rd.steps,
        metavar="N",
        help="sampling steps from t = 1 to 0 (default: %(default)s)",
    )
    p.add_argument("--shift", type=float, default=None,
                   help="schedule time shift (default: the model's; 3 for tiny, SD3)")  # fmt: skip
    p.add_argument("--noise-level", type=float, default=rd.noise_level,
                   help="Flow-GRPO SDE noise level (default: %(default)s)")  # fmt: skip
    p.add_argument(
        "--batch",
        type=_int_in(1),
        default=rd.batch,
        metavar="B",
        help="rollouts searched together; a forward has B*K rows (default: %(default)s)",
    )
    p.add_argument(
        "--seed",
        type=_int_in(0, 2**62),
        default=0,
        help="keys the prompts (tiny), initial noise, random noise and the search",
    )
    p.add_argument("--device", type=_device, default=None,
                   help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")  # fmt: skip
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")  # fmt: skip
    p.add_argument("--no-graph", action="store_true",
                   help="run rounds stage by stage even on CUDA")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("search_out"), metavar="DIR",
                   help="folder for result.json, grid.png, rounds.png "
                        "(default: %(default)s)")  # fmt: skip
    p.set_defaults(handler=_run_search, parser=p)


def _read_prompts(args: argparse.Namespace) -> list[str]:
    parser: argparse.ArgumentParser = args.parser
    if args.prompt:
        return list(args.prompt)
    if args.prompts is not None:
        if not args.prompts.is_file():
            parser.error(f"argument --prompts: {args.prompts} is not a file")
        lines = [ln.strip() for ln in args.prompts.read_text().splitlines()]
        prompts = [ln for ln in lines if ln and not ln.startswith("#")]
        if not prompts:
            parser.error(f"argument --prompts: {args.prompts} holds no prompts")
        return prompts
    if args.model != "tiny":
        parser.error("give --prompt or --prompts for a model other than tiny")
    from smartgrpo_fast.models.tiny import sample_prompts

    return sample_prompts(args.num_prompts, getattr(args, "prompt_seed", args.seed))


def _run_search(args: argparse.Namespace) -> int:
    from smartgrpo_fast import models
    from smartgrpo_fast.rewards import reward_from_spec
    from smartgrpo_fast.search import RolloutConfig, SearchConfig, compare_noise
    from smartgrpo_fast.search.report import (
        plot_rounds,
        result_dict,
        save_comparison_grid,
        write_result,
    )

    parser: argparse.ArgumentParser = args.parser
    device = args.device or _default_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"argument --device: {device!r} requested but CUDA is not available")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    prompts = _read_prompts(args)
    try:
        search = SearchConfig(
            k=args.k, rounds=args.rounds, top=args.top, use=args.use, alpha=args.alpha,
            min_sigma=args.min_sigma, per_element=not args.pooled_sigma, rescale=args.rescale,
            seed=args.seed, graph=not args.no_graph,
        )  # fmt: skip
        rollout = RolloutConfig(
            steps=args.steps, step=args.step, shift=args.shift, noise_level=args.noise_level,
            seed=args.seed, batch=args.batch,
        )  # fmt: skip
        reward = reward_from_spec(args.reward, device=device)
    except ValueError as err:
        parser.error(str(err))
    model = models.load(args.model, device=device, dtype=dtype)
    print(f"{len(prompts)} prompts, K={search.k} N={search.rounds} T={search.top} "
          f"use={search.use}, SDE step {rollout.step}/{rollout.steps}, reward {args.reward}, "
          f"{device}", file=sys.stderr)  # fmt: skip
    comp = compare_noise(model, reward, prompts, search, rollout, progress=True)
    result = result_dict(comp, search, rollout, model=args.model, reward=args.reward,
                         device=device, extra={"version": __version__})  # fmt: skip
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
        print(f"final reward {key:>8}: {s['mean']:.4f} ± {s['std']:.4f}")
    for key in ("searched_vs_random", "searched_vs_bestof"):
        s = summ[key]
        t = "nan" if s["t"] is None else f"{s['t']:.2f}"
        print(f"{key}: mean diff {s['mean_diff']:+.4f}, paired t = {t} (df {s['df']}), "
              f"wins {s['win_rate']:.0%}")  # fmt: skip
    cps = result["throughput"]["candidates_per_second"]
    if cps:
        print(f"search: {cps:.0f} candidates/s")
    print(f"JSON: {json_path}\nPNG:  {grid}\nPNG:  {curve}")
    return 0


def _add_eval(commands: argparse._SubParsersAction) -> None:
    from smartgrpo_fast.train.data import EVAL_PROMPT_SEED
    from smartgrpo_fast.train.evaluate import EvalConfig

    d = EvalConfig()
    p = commands.add_parser(
        "eval",
        help="mean reward of a model (or its LoRA adapter against the base) on fresh prompts",
        description=(
            "Sample each prompt with the ODE from fixed initial noise (Philox, keyed by --seed "
            "and the prompt's index: the batch size does not change results) and score the "
            "images with --reward. With --lora, the base model and the adapter are evaluated "
            "on the same prompts and noise and compared by a paired t statistic (unless "
            "--no-base). Writes DIR/result.json (config, prompts, reward: one reward per "
            "prompt of the adapter, else of the model; reward_base when compared; match and "
            "match_rate: all attributes recognised, for rewards that can tell (tiny); summary: "
            "mean ± std, paired statistics, match rates; seconds), DIR/grid.png (and "
            "grid_base.png when compared)."
        ),
    )
    p.add_argument("--model", default="tiny",
                   help="tiny (embedded) or a StableDiffusion3Pipeline folder / cached repo id "
                        "(default: %(default)s)")  # fmt: skip
    p.add_argument("--lora", type=Path, default=None, metavar="PATH",
                   help="a peft adapter folder (models.lora.save_adapter's) or a trainer "
                        "checkpoint RUN/checkpoints/step-N holding one in adapter/, to "
                        "evaluate (default: none, the model alone)")  # fmt: skip
    p.add_argument("--no-base", action="store_true",
                   help="with --lora, evaluate only the adapter (default: the base model too, "
                        "with paired statistics)")  # fmt: skip
    p.add_argument("--reward", default=DEMO_REWARD, metavar="NAME[:WEIGHT],...",
                   help="reward, or a weighted sum of rewards by name; names: see "
                        "smartgrpo_fast.rewards.NAMES (default: %(default)s)")  # fmt: skip
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", metavar="TEXT",
                     help="a prompt (repeatable; default: none)")  # fmt: skip
    src.add_argument("--prompts", type=Path, metavar="FILE",
                     help="a text file, one prompt per line (blank lines and #-comments "
                          "skipped; default: none)")  # fmt: skip
    src.add_argument("--num-prompts", type=_int_in(1), default=128, metavar="N",
                     help="with --model tiny and no prompts given: N prompts sampled from the "
                          "embedded world with --prompt-seed (default: %(default)s)")  # fmt: skip
    p.add_argument("--prompt-seed", type=_int_in(0, 2**62), default=EVAL_PROMPT_SEED,
                   metavar="S",
                   help="seed of the sampled tiny prompts; the default is the trainer's "
                        "held-out draw (train.data.EVAL_PROMPT_SEED; its training draws use "
                        "seeds >= 2**40) (default: %(default)s)")  # fmt: skip
    p.add_argument("--seed", type=_int_in(0, 2**62), default=d.seed, metavar="S",
                   help="keys the initial noise (default: %(default)s)")  # fmt: skip
    p.add_argument("--steps", type=_int_in(1), default=d.steps, metavar="N",
                   help="ODE steps from t = 1 to 0 (default: %(default)s)")  # fmt: skip
    p.add_argument("--shift", type=float, default=None,
                   help="schedule time shift (default: the model's; 3 for tiny, SD3)")  # fmt: skip
    p.add_argument("--batch", type=_int_in(1), default=d.batch, metavar="B",
                   help="prompts sampled together (default: %(default)s)")  # fmt: skip
    p.add_argument("--device", type=_device, default=None,
                   help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")  # fmt: skip
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("eval_out"), metavar="DIR",
                   help="folder for result.json and grid.png (default: %(default)s)")  # fmt: skip
    p.set_defaults(handler=_run_eval, parser=p)


def _run_eval(args: argparse.Namespace) -> int:
    from smartgrpo_fast import models
    from smartgrpo_fast.rewards import reward_from_spec
    from smartgrpo_fast.search.report import write_result
    from smartgrpo_fast.train.evaluate import (
        EvalConfig,
        evaluate,
        paired_comparison,
        result_dict,
        save_grid,
    )

    parser: argparse.ArgumentParser = args.parser
    device = args.device or _default_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"argument --device: {device!r} requested but CUDA is not available")
    dtype_name = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    if args.lora is not None and not args.lora.exists():
        parser.error(f"argument --lora: {args.lora} does not exist")
    if args.lora is not None and (args.lora / "adapter" / "adapter_config.json").is_file() \
            and not (args.lora / "adapter_config.json").exists():  # fmt: skip
        args.lora = args.lora / "adapter"  # a trainer checkpoint folder
    if args.no_base and args.lora is None:
        parser.error("argument --no-base: only with --lora")
    prompts = _read_prompts(args)
    try:
        config = EvalConfig(steps=args.steps, seed=args.seed, batch=args.batch, shift=args.shift)
        reward = reward_from_spec(args.reward, device=device)
    except ValueError as err:
        parser.error(str(err))
    kw = {"device": device, "dtype": getattr(torch, dtype_name)}
    try:
        model = models.load(args.model, **kw, **({"lora": args.lora} if args.lora else {}))
    except (FileNotFoundError, ValueError) as err:
        parser.error(" ".join(str(err).split()))
    compare = args.lora is not None and not args.no_base
    print(f"{len(prompts)} prompts, {config.steps} ODE steps, reward {args.reward}, {device}"
          + (f", adapter {args.lora}" + (" vs base" if compare else "") if args.lora else ""),
          file=sys.stderr)  # fmt: skip
    base = None
    if compare:
        from smartgrpo_fast.models.lora import adapter_disabled

        with adapter_disabled(model):
            base = evaluate(model, reward, prompts, config, progress=True)
    res = evaluate(model, reward, prompts, config, progress=True)
    out: Path = args.out
    cfg = {"model": args.model, "lora": None if args.lora is None else str(args.lora),
           "reward": args.reward, "device": device, "dtype": dtype_name,
           "prompt_seed": args.prompt_seed if args.prompt is None and args.prompts is None
           else None}  # fmt: skip
    result = result_dict(res, config, base=base, meta=cfg, extra={"version": __version__})
    json_path = write_result(result, out / "result.json")
    grids = [save_grid(res.images, out / "grid.png")]
    if base is not None:
        grids.append(save_grid(base.images, out / "grid_base.png"))
    for name, r in (("base", base), ("adapter" if args.lora else "model", res)):
        if r is not None:
            rate = "" if r.match_rate is None else f", prompt-match rate {r.match_rate:.1%}"
            bad = f", {r.nonfinite} non-finite left out" if r.nonfinite else ""
            print(f"reward {name:>7}: {r.mean:.4f} ± {r.std:.4f}{rate}{bad}")
    if base is not None:
        s = paired_comparison(res, base)
        t = "nan" if s["t"] != s["t"] else f"{s['t']:.2f}"
        print(f"adapter_vs_base: mean diff {s['mean_diff']:+.4f}, paired t = {t} "
              f"(df {s['df']}), wins {s['win_rate']:.0%}")  # fmt: skip
    print(f"JSON: {json_path}\n" + "\n".join(f"PNG:  {g}" for g in grids))
    return 0


def _add_plot(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "plot",
        help="training curves of runs: a metric against steps and against wall time",
        description=(
            "Read RUN/metrics.jsonl (and RUN/eval.jsonl) of each run and draw two panels: "
            "--metric against the optimizer step and against the training wall time (the "
            "cumulative sum of time_step, minutes), one line per run labelled by its folder "
            "name; eval_METRIC (e.g. eval_reward_mean) as markers where logged."
        ),
    )
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN",
                   help="run folders written by smartgrpo-fast train")  # fmt: skip
    p.add_argument("--metric", default="reward_mean",
                   help="the metrics.jsonl key to plot (default: %(default)s)")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("runs.png"), metavar="FILE.png",
                   help="the PNG to write (default: %(default)s)")  # fmt: skip
    p.set_defaults(handler=_run_plot, parser=p)


def _run_plot(args: argparse.Namespace) -> int:
    from smartgrpo_fast.train.plot import plot_runs

    try:
        path = plot_runs(args.runs, args.out, metric=args.metric)
    except (FileNotFoundError, ValueError) as err:
        args.parser.error(str(err))
    except ImportError as err:
        print(f"error: {err} (pip install 'smartgrpo-fast[bench]')", file=sys.stderr)
        return 1
    print(f"PNG:  {path}")
    return 0


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _providers(
    parser: argparse.ArgumentParser, requested: Sequence[str] | None, device: str
) -> tuple[str, ...]:
    """The providers to time: ``requested`` (an argument error if one cannot run here), or the
    device's defaults less those that cannot run here (with a note on stderr)."""
    if requested:
        chosen = tuple(dict.fromkeys(requested))
        for provider in chosen:
            problem = bench_ops.provider_problem(provider, device)
            if problem is not None:
                parser.error(f"argument --providers: {provider} cannot run on {device}: {problem}")
        return chosen
    defaults = bench_ops.CUDA_PROVIDERS if device.startswith("cuda") else bench_ops.CPU_PROVIDERS
    chosen = []
    for provider in defaults:
        problem = bench_ops.provider_problem(provider, device)
        if problem is None:
            chosen.append(provider)
        else:
            print(f"note: provider {provider} left out: {problem}", file=sys.stderr)
    return tuple(chosen)


def _run_bench_ops(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.parser
    device = args.device or _default_device()
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            parser.error(f"argument --device: {device!r} requested but CUDA is not available")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            parser.error(
                f"argument --device: {device!r} requested but only "
                f"{torch.cuda.device_count()} CUDA device(s) are visible"
            )
    providers = _providers(parser, args.providers, device)
    try:
        config = bench_ops.OpsBenchConfig.for_device(
            device,
            ops=tuple(dict.fromkeys(args.ops)),
            providers=providers,
            sizes=tuple(dict.fromkeys(args.sizes)) if args.sizes else None,
            dtype=args.dtype,
            repeats=args.repeats,
            warmup=args.warmup,
            seed=args.seed,
            validate=args.validate,
        )
    except ValueError as err:
        parser.error(str(err))
    for size in config.sizes:
        actual = bench_ops.case_shape(size).elements
        if actual != size:
            print(f"note: size {size} runs as K·D = {actual}", file=sys.stderr)

    rows = bench_ops.run_ops_bench(config, progress=not args.no_progress)
    stem = args.out / f"ops_{device.replace(':', '')}_{config.dtype}"
    csv_path = bench_ops.write_csv(rows, stem.with_suffix(".csv"))
    json_path = bench_ops.write_json(rows, stem.with_suffix(".json"))
    first = rows[0]
    print(
        f"smartgrpo_fast {first['smartgrpo_fast_version']} ops benchmark on "
        f"{first['device_name']} ({first['device']}), torch {first['torch_version']}, "
        f"{config.repeats} repeats, {config.warmup} warm-up, commit {first['git_commit']}"
    )
    print(bench_ops.format_table(rows))
    print(f"\nCSV:  {csv_path}\nJSON: {json_path}")
    if not args.no_plot:
        try:
            png_path = bench_ops.plot_csv(csv_path, stem.with_suffix(".png"))
        except ImportError as err:
            print(
                f"plot skipped: {err} (pip install 'smartgrpo-fast[bench]')",
                file=sys.stderr,
            )
        else:
            print(f"PNG:  {png_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``smartgrpo-fast`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code.

    Argument errors exit with status 2 and a message naming the argument (argparse).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
