"""``smartgrpo-fast plot``: training curves of runs against steps and wall time."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from smartgrpo_fast.cli import args as cli_args

__all__ = ["add_plot"]


def add_plot(commands: argparse._SubParsersAction) -> None:
    """Register ``plot`` on the top-level sub-command parser."""
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
    cli_args.add_out(p, "runs.png", "the PNG to write", metavar="FILE.png")
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
