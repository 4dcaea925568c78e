"""The ``smartgrpo-fast`` command line: a thin layer over the library's configs.

Commands, one module each:

* ``smartgrpo-fast bench ops|velocity|search`` (:mod:`.bench`): time the fused ops against
  unfused PyTorch, the batched velocity per backend, one whole noise search;
  ``bench train`` registers from :mod:`smartgrpo_fast.bench.train`.
* ``smartgrpo-fast grid`` (:mod:`.grid`): an image grid of the embedded model.
* ``smartgrpo-fast search`` (:mod:`.search`): searched vs random vs best-of-M noise on the
  same rollouts; writes result.json, an image grid and the per-round reward curve.
* ``smartgrpo-fast eval`` (:mod:`.evaluate`): the mean reward of a model, or of its LoRA
  adapter against the base model (paired), on fresh prompts.
* ``smartgrpo-fast plot`` (:mod:`.plot`): training curves of runs against steps and wall time.
* ``smartgrpo-fast train``: registers from :mod:`smartgrpo_fast.train.cli`.
* ``smartgrpo-fast --version``.

:mod:`.args` holds the argument groups the commands share (model, reward, prompts, device,
dtype, seed, batch, out, progress) and :mod:`.build` what they turn into. Every option's help
names its default. ``python -m smartgrpo_fast`` runs the same :func:`main`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from smartgrpo_fast import __version__

__all__ = ["PROG", "build_parser", "main"]

PROG = "smartgrpo-fast"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``smartgrpo-fast``."""
    from smartgrpo_fast.cli.bench import add_bench
    from smartgrpo_fast.cli.evaluate import add_eval
    from smartgrpo_fast.cli.grid import add_grid
    from smartgrpo_fast.cli.plot import add_plot
    from smartgrpo_fast.cli.search import add_search
    from smartgrpo_fast.train.cli import add_train_command

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Fast Smart-GRPO: fused ops and CEM noise search for flow-matching models.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_bench(commands)
    add_grid(commands)
    add_search(commands)
    add_eval(commands)
    add_plot(commands)
    add_train_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``smartgrpo-fast`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code.

    Argument errors exit with status 2 and a message naming the argument (argparse).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
