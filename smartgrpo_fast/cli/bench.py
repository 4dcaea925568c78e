"""``smartgrpo-fast bench ops|velocity|search|preview`` (``bench train`` registers from
:mod:`smartgrpo_fast.bench.train`): each times one part of the library and writes its rows to
CSV and JSON under --out, prints a table and, where it has one, draws a PNG."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from smartgrpo_fast.bench import ops as bench_ops
from smartgrpo_fast.cli import args as cli_args
from smartgrpo_fast.cli import build
from smartgrpo_fast.cli.args import int_in

__all__ = ["add_bench"]

_SUFFIXES = {"K": 2**10, "M": 2**20, "G": 2**30}


def add_bench(commands: argparse._SubParsersAction) -> None:
    """Register ``bench`` and its targets on the top-level sub-command parser."""
    bench = commands.add_parser(
        "bench",
        help="run a benchmark",
        description="Run a benchmark and write its results (CSV, JSON, PNG) to --out.",
    )
    targets = bench.add_subparsers(dest="target", metavar="TARGET", required=True)
    _add_bench_ops(targets)
    _add_bench_velocity(targets)
    _add_bench_search(targets)
    _add_bench_preview(targets)
    from smartgrpo_fast.bench.train import add_bench_train

    add_bench_train(targets)


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


def _add_timing(
    p: argparse.ArgumentParser, repeats: int | str, warmup: int | str, *, min_warmup: int = 0
) -> None:
    """--repeats and --warmup: each default an int, or a str saying what None stands for."""
    for flag, default, lo, what in (
        ("--repeats", repeats, 1, "timed calls per measurement"),
        ("--warmup", warmup, min_warmup, "untimed calls before them"),
    ):
        given = isinstance(default, int)
        p.add_argument(flag, type=int_in(lo), default=default if given else None, metavar="N",
                       help=f"{what} (default: {'%(default)s' if given else default})")  # fmt: skip


def _add_common(p: argparse.ArgumentParser, handler: Callable[[argparse.Namespace], int]) -> None:
    """--device and --out, and the handler."""
    cli_args.add_device(p)
    cli_args.add_out(p, "bench_out", "output directory")
    p.set_defaults(handler=handler, parser=p)


def _config(args: argparse.Namespace, factory: Callable[..., Any], **kwargs: Any) -> Any:
    """``factory(**kwargs)``, its ValueError an argument error."""
    try:
        return factory(**kwargs)
    except ValueError as err:
        args.parser.error(str(err))


def _write(rows: list[dict], stem: Path, header: str, table: str) -> Path:
    """Write ``rows`` to STEM.csv and STEM.json, print ``header``, ``table`` and the paths;
    return the CSV's path."""
    csv_path = bench_ops.write_csv(rows, stem.with_suffix(".csv"))
    json_path = bench_ops.write_json(rows, stem.with_suffix(".json"))
    print(header)
    print(table)
    print(f"\nCSV:  {csv_path}\nJSON: {json_path}")
    return csv_path


def _plot(draw: Callable[[Path, Path], Path], csv_path: Path, png_path: Path) -> None:
    """Draw a PNG from the CSV, or say on stderr why not (matplotlib missing)."""
    try:
        path = draw(csv_path, png_path)
    except ImportError as err:
        print(f"plot skipped: {err} (pip install 'smartgrpo-fast[bench]')", file=sys.stderr)
    else:
        print(f"PNG:  {path}")


def _run_meta(rows: list[dict]) -> str:
    first = rows[0]
    return f"torch {first['torch_version']}, commit {first['git_commit']}"


# --------------------------------------------------------------------------------- ops


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
    p.add_argument("--ops", nargs="+", choices=bench_ops.OPS, default=list(bench_ops.OPS),
                   metavar="OP", help=f"ops to time, from: {', '.join(bench_ops.OPS)} "
                   "(default: all)")  # fmt: skip
    p.add_argument("--providers", nargs="+", choices=bench_ops.PROVIDERS, default=None,
                   metavar="P", help=f"providers to time, from: {', '.join(bench_ops.PROVIDERS)} "
                   f"(default: {' '.join(bench_ops.CPU_PROVIDERS)} on CPU, "
                   f"{' '.join(bench_ops.CUDA_PROVIDERS)} on CUDA, less those that cannot run "
                   "here)")  # fmt: skip
    p.add_argument("--sizes", nargs="+", type=_size, default=None, metavar="N",
                   help="K·D element counts, each >= 256; suffixes K, M, G are powers of 2 "
                        "(default: 64K 256K 1M 4M 16M on CPU, 1M 4M 16M 64M on CUDA)")  # fmt: skip
    cli_args.add_dtype(p, what="storage dtype of the latents; rewards, mu and sigma stay float32",
                       choices=tuple(bench_ops.DTYPES), default="float32")  # fmt: skip
    _add_timing(p, "10 on CPU, 100 on CUDA", "2 on CPU, 10 on CUDA")
    cli_args.add_seed(p, 0, "seed of the inputs and the noise", hi=2**63)
    p.add_argument("--validate", action="store_true",
                   help="call the fused ops with validate=True (value checks, which sync CUDA) "
                        "(default: off)")  # fmt: skip
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG plot "
                   "(default: written)")  # fmt: skip
    cli_args.add_progress(p)
    _add_common(p, _run_bench_ops)


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
    device = build.resolve_device(args)
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            parser.error(f"argument --device: {device!r} requested but only "
                         f"{torch.cuda.device_count()} CUDA device(s) are visible")  # fmt: skip
    providers = _providers(parser, args.providers, device)
    config = _config(
        args, bench_ops.OpsBenchConfig.for_device, device=device,
        ops=tuple(dict.fromkeys(args.ops)), providers=providers,
        sizes=tuple(dict.fromkeys(args.sizes)) if args.sizes else None, dtype=args.dtype,
        repeats=args.repeats, warmup=args.warmup, seed=args.seed, validate=args.validate,
    )  # fmt: skip
    for size in config.sizes:
        actual = bench_ops.case_shape(size).elements
        if actual != size:
            print(f"note: size {size} runs as K·D = {actual}", file=sys.stderr)
    rows = bench_ops.run_ops_bench(config, progress=not args.no_progress)
    stem = args.out / f"ops_{device.replace(':', '')}_{config.dtype}"
    first = rows[0]
    header = (f"smartgrpo_fast {first['smartgrpo_fast_version']} ops benchmark on "
              f"{first['device_name']} ({first['device']}), {config.repeats} repeats, "
              f"{config.warmup} warm-up, {_run_meta(rows)}")  # fmt: skip
    csv_path = _write(rows, stem, header, bench_ops.format_table(rows))
    if not args.no_plot:
        _plot(bench_ops.plot_csv, csv_path, stem.with_suffix(".png"))
    return 0


# ---------------------------------------------------------------------------- velocity


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
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=["eager", "graph"],
                   metavar="BACKEND", help=f"backends to time, from: {', '.join(BACKENDS)} "
                   "(default: eager graph)")  # fmt: skip
    p.add_argument("--batches", nargs="+", type=int_in(1), default=[1, 4, 16], metavar="N",
                   help="rows N = B*K per call to time (default: 1 4 16)")  # fmt: skip
    cli_args.add_dtype(p, what="transformer dtype", choices=tuple(bench_ops.DTYPES))
    _add_timing(p, 10, 3, min_warmup=1)
    _add_common(p, _run_bench_velocity)


def _run_bench_velocity(args: argparse.Namespace) -> int:
    from smartgrpo_fast.bench import velocity

    device = build.resolve_device(args)
    dtype = build.model_dtype(args, device)
    cfg = _config(
        args, velocity.VelocityBenchConfig, model=args.model,
        batches=tuple(dict.fromkeys(args.batches)), backends=tuple(dict.fromkeys(args.backends)),
        dtype=dtype, device=device, repeats=args.repeats, warmup=args.warmup,
    )  # fmt: skip
    rows = velocity.run(cfg)
    stem = args.out / f"velocity_{Path(args.model).name}_{device.replace(':', '')}_{dtype}"
    header = (f"velocity of {args.model} on {rows[0]['device_name']} ({device}), {dtype}, "
              f"{_run_meta(rows)}")  # fmt: skip
    _write(rows, stem, header, velocity.format_velocity_table(rows))
    return 0


# ------------------------------------------------------------------------------ search


def _provider(text: str) -> str:
    """argparse type of bench search's --providers: a provider name, options in order."""
    from smartgrpo_fast.bench.search import canonical_provider

    try:
        return canonical_provider(text.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("providers: ")) from None


def _add_bench_search(sub: argparse._SubParsersAction) -> None:
    from smartgrpo_fast.bench.search import (
        COMPILE_BACKENDS,
        MODELS,
        OPTIONS,
        PREVIEW_RANDOM,
        PROVIDERS,
        SearchBenchConfig,
    )

    d = SearchBenchConfig()
    p = sub.add_parser(
        "search",
        help="time one whole noise search: naive reference vs fused vs whole-round CUDA graph",
        description=(
            "Time one search of B rollouts (K candidates, N rounds, T elites) per provider: "
            "reference (naive: torch.randn noise, unfused, Python loop), fused (NoiseSearch "
            "stage by stage), graph (one captured round replayed N times; CUDA), and on SD3 "
            "models variants fused+OPT / graph+OPT with options preview (the estimates "
            "decoded by --preview-decoder), compile (the transformer on --backend) and fp8 "
            "(a float8 copy of the transformer for the search's forwards; CUDA, compute "
            "capability >= 8.9), e.g. graph+preview+compile. Models: tiny (embedded), "
            "sd3-tiny (tiny random SD3 pipeline), sd35-medium (full-size random SD3.5-medium "
            "at 512 px; GPU). Also splits a round of every provider but plain graph into its "
            "stages (sample, forward, x0, decode, reward, select/update; a device synchronize "
            "and a timer around each; a graph variant's stages run the code its graph "
            "captured) and measures each provider's peak memory (CUDA: max_memory_allocated; "
            "CPU: the process's peak RSS). Writes search_*.csv/json, a stacked-bar plot "
            "search_*_stages.png, and prints candidates/s and the split."
        ),
    )
    p.add_argument("--model", choices=MODELS, default=d.model,
                   help=f"the model searched, from: {', '.join(MODELS)} "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--providers", nargs="+", type=_provider, default=None, metavar="P",
                   help=f"providers to time: {', '.join(PROVIDERS)}, or fused / graph with "
                   f"+options from {', '.join(OPTIONS)} (default: reference fused, + graph "
                   "on CUDA)")  # fmt: skip
    p.add_argument("--batch", type=int_in(1), default=d.batch, metavar="B",
                   help="rollouts searched together (default: %(default)s)")  # fmt: skip
    cli_args.add_cem(p, d.k, d.rounds, d.top)
    cli_args.add_dtype(p, choices=tuple(bench_ops.DTYPES))
    p.add_argument("--preview-decoder", default=d.preview_decoder, metavar="DIR",
                   help=f"the preview option's decoder: {PREVIEW_RANDOM} (TAESD3's layout with "
                   "random weights at the model's size) or a local AutoencoderTiny folder "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--backend", choices=COMPILE_BACKENDS, default=d.backend,
                   help="the compile option's transformer backend; providers without it run "
                        "the transformer eagerly (default: %(default)s)")  # fmt: skip
    p.add_argument("--decode-size", type=int_in(1), default=None, metavar="PX",
                   help="resize each decoded candidate to PX x PX before the reward, every "
                        "provider (default: no resize)")  # fmt: skip
    cli_args.add_reward(p, example=" (e.g. imagereward with --reward-arg "
                        "imagereward.random=true: a full-size random ImageReward, as a "
                        "training step's search pays it)", default=None,
                        default_text="the model's analytic reward: tiny on the embedded "
                        "model, tiny-color on the SD3 models")  # fmt: skip
    _add_timing(p, d.repeats, d.warmup)
    p.add_argument("--no-plot", action="store_true",
                   help="do not draw the stage split's PNG (default: drawn)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true",
                   help="no progress lines on stderr (default: one line as each part starts "
                        "or ends, with the seconds since the start)")  # fmt: skip
    _add_common(p, _run_bench_search)


def _run_bench_search(args: argparse.Namespace) -> int:
    from smartgrpo_fast.bench import search

    device = build.resolve_device(args)
    dtype = build.model_dtype(args, device)
    cuda = device.startswith("cuda")
    providers = args.providers or (
        ("reference", "fused", "graph") if cuda else ("reference", "fused")
    )
    cfg = _config(
        args, search.SearchBenchConfig, model=args.model,
        providers=tuple(dict.fromkeys(providers)), batch=args.batch, k=args.k,
        rounds=args.rounds, top=args.top, dtype=dtype, device=device, repeats=args.repeats,
        warmup=args.warmup, preview_decoder=args.preview_decoder, backend=args.backend,
        decode_size=args.decode_size,
    )  # fmt: skip
    if any("preview" in p for p in cfg.providers) and cfg.preview_decoder != "random":
        folder = Path(cfg.preview_decoder).expanduser()
        if not (folder / "config.json").is_file():
            args.parser.error(f"argument --preview-decoder: {folder / 'config.json'}: not found "
                              "(an AutoencoderTiny folder, or 'random')")  # fmt: skip
    if args.reward is None and args.reward_arg:
        args.parser.error("argument --reward-arg: needs --reward (the default reward is the "
                          "model's analytic one, which takes no arguments)")  # fmt: skip
    reward = None if args.reward is None else build.build_reward(args, device)
    log = None if args.no_progress else (lambda line: print(line, file=sys.stderr, flush=True))
    rows = search.run(cfg, reward=reward, log=log)
    stem = args.out / f"search_{args.model}_{device.replace(':', '')}_{dtype}"
    header = (f"search of {args.model} on {rows[0]['device_name']} ({device}), {dtype}, "
              f"B={cfg.batch} K={cfg.k} N={cfg.rounds} T={cfg.top}, {_run_meta(rows)}")  # fmt: skip
    if args.reward is not None:
        given = " ".join(a.text for a in args.reward_arg)
        header += f"\nreward: {args.reward}" + (f" ({given})" if given else "")
    if any("+" in p for p in cfg.providers):
        size = cfg.decode_size or "none"
        header += (f"\noptions: preview decoder {cfg.preview_decoder}, compile backend "
                   f"{cfg.backend}, decode size {size}")  # fmt: skip
    csv_path = _write(rows, stem, header, search.format_search_table(rows))
    if not args.no_plot and any(r["metric"] == "stage_time" for r in rows):
        _plot(search.plot_stage_split, csv_path, stem.with_name(stem.name + "_stages.png"))
    return 0


# ----------------------------------------------------------------------------- preview


def _add_bench_preview(sub: argparse._SubParsersAction) -> None:
    from smartgrpo_fast.bench.preview import PreviewBenchConfig

    d = PreviewBenchConfig()
    p = sub.add_parser(
        "preview",
        help="how faithful a cheap preview is: rank agreement of its rewards, time per candidate",
        description=(
            "On B prompts' rollouts, draw K candidates at SDE step --step as the search's first "
            "round does, and score them several ways: the one-step estimates decoded by "
            "--preview-decoder against the same estimates decoded by the VAE (SD3 models), "
            "and the estimate after 1 and --preview-steps M Euler steps to t = 0 against each "
            "candidate's final image (the rollout's remaining ODE steps). Prints, per path, "
            "the time per candidate and, against its reference, the Spearman rank correlation "
            "and the top-T overlap over each prompt's K candidates (mean over prompts). "
            "Writes preview_*.csv/json. On the embedded model (pixel space) the decoder rows "
            "are skipped with a note."
        ),
    )
    p.add_argument("--model", default=d.model,
                   help="tiny, sd3-tiny, sd35-medium (random weights) or a "
                        "StableDiffusion3Pipeline folder (default: %(default)s)")  # fmt: skip
    p.add_argument("--preview-decoder", default=None, metavar="DIR",
                   help="an AutoencoderTiny folder, or 'random' (TAESD3's layout, random "
                        "weights; sd3-tiny, sd35-medium) (default: none: no decoder "
                        "rows)")  # fmt: skip
    p.add_argument("--reward", default=None,
                   help="the reward (default: tiny for the embedded model, tiny-color for "
                        "the random SD3 models)")  # fmt: skip
    p.add_argument("--prompts", type=Path, default=None, metavar="FILE",
                   help="prompts, one per line (default: --batch sampled tiny "
                        "prompts)")  # fmt: skip
    p.add_argument("--batch", type=int_in(1), default=d.batch, metavar="B",
                   help="prompts (default: %(default)s)")  # fmt: skip
    p.add_argument("--k", type=int_in(2), default=d.k,
                   help="candidates per prompt (default: %(default)s)")  # fmt: skip
    p.add_argument("--top", type=int_in(1), default=d.top, metavar="T",
                   help="T of the top-T overlap (default: %(default)s)")  # fmt: skip
    p.add_argument("--preview-steps", type=int_in(1), default=d.preview_steps, metavar="M",
                   help="the lookahead rows' M (default: %(default)s)")  # fmt: skip
    p.add_argument("--decode-size", type=int_in(1), default=None, metavar="PX",
                   help="resize decoded images before the reward (default: no resize)")  # fmt: skip
    p.add_argument("--steps", type=int_in(1), default=d.steps,
                   help="sampling steps (default: %(default)s)")  # fmt: skip
    p.add_argument("--step", type=int_in(0), default=d.step,
                   help="the SDE step the candidates follow (default: %(default)s)")  # fmt: skip
    cli_args.add_dtype(p, choices=tuple(bench_ops.DTYPES))
    cli_args.add_seed(p, d.seed, "keys the prompts, the rollouts and the candidates")
    _add_timing(p, d.repeats, d.warmup)
    _add_common(p, _run_bench_preview)


def _run_bench_preview(args: argparse.Namespace) -> int:
    from smartgrpo_fast.bench import preview

    device = build.resolve_device(args)
    dtype = build.model_dtype(args, device)
    prompts = None
    if args.prompts is not None:
        if not args.prompts.is_file():
            args.parser.error(f"argument --prompts: {args.prompts} is not a file")
        lines = [ln.strip() for ln in args.prompts.read_text().splitlines()]
        prompts = tuple(ln for ln in lines if ln and not ln.startswith("#"))
    cfg = _config(
        args, preview.PreviewBenchConfig, model=args.model, preview_decoder=args.preview_decoder,
        reward=args.reward, prompts=prompts, batch=args.batch, k=args.k, top=args.top,
        preview_steps=args.preview_steps, decode_size=args.decode_size, steps=args.steps,
        step=args.step, dtype=dtype, device=device, seed=args.seed, repeats=args.repeats,
        warmup=args.warmup,
    )  # fmt: skip
    try:
        rows, notes = preview.run(cfg)
    except (FileNotFoundError, ValueError) as err:
        args.parser.error(build.one_line(err))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    stem = args.out / f"preview_{Path(args.model).name}_{device.replace(':', '')}_{dtype}"
    header = (f"preview fidelity of {args.model} on {rows[0]['device_name']} ({device}), "
              f"{dtype}, {_run_meta(rows)}")  # fmt: skip
    _write(rows, stem, header, preview.format_preview_table(rows))
    return 0
