"""``smartgrpo-fast train``: the GRPO trainer's command line (a thin layer over the config).

::

    smartgrpo-fast train --config tiny --out runs/smart seed=3 noise=random train.steps=50
    smartgrpo-fast train --resume runs/smart train.steps=100
    torchrun --nproc_per_node=2 -m smartgrpo_fast train --config tiny --out runs/ddp
    accelerate launch -m smartgrpo_fast train --config tiny --out runs/ddp
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

__all__ = ["add_train_command"]


def add_train_command(commands: argparse._SubParsersAction) -> None:
    """Register ``train`` on the top-level sub-command parser."""
    from smartgrpo_fast.train.config import shipped_configs

    p = commands.add_parser(
        "train",
        help="train a flow model with GRPO and searched (or random / best-of-M) noise",
        description=(
            "GRPO training of a flow model (Flow-GRPO's SDE rollouts and clipped loss) with the "
            "exploration noise of each rollout searched by CEM (noise=smart), drawn at random "
            "(noise=random, plain Flow-GRPO) or the best of K*N draws (noise=bestof). Writes "
            "RUN/config.yaml, metrics.jsonl, eval.jsonl, samples/, checkpoints/step-NNNNNN/. "
            "Multi-process: torchrun --nproc_per_node=N -m smartgrpo_fast train ... or "
            "accelerate launch -m smartgrpo_fast train ..."
        ),
        epilog="Overrides are dotted keys of the config with YAML values, e.g. seed=3 "
        "noise=random train.steps=3 sample.group_size=4 search.k=4 lora.rank=8 lora=null.",
    )
    p.add_argument(
        "--config",
        default="tiny",
        help=f"a shipped config ({', '.join(shipped_configs())}) or a YAML file (default: tiny)",
    )
    p.add_argument("--out", type=Path, help="the run folder to create (required unless --resume)")
    p.add_argument(
        "--resume",
        type=Path,
        metavar="RUN",
        help="continue RUN from its newest complete checkpoint, with RUN/config.yaml and the "
        "overrides (default: start a new run)",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config as YAML and exit (default: train)",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.set_defaults(handler=_run_train, parser=p)


def _error(args: argparse.Namespace, message: str) -> int:
    """One line on stderr, ``smartgrpo-fast train: error: <key or file>: <what>``; exit 2."""
    print(f"{args.parser.prog}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def _run_train(args: argparse.Namespace) -> int:
    import yaml

    from smartgrpo_fast.train.checkpoint import CheckpointError
    from smartgrpo_fast.train.config import ConfigError, config_to_dict, load_config

    parser: argparse.ArgumentParser = args.parser
    if args.resume is None and args.out is None:
        parser.error("argument --out: required to start a run (or give --resume RUN)")
    if args.resume is not None and args.out is not None and args.out != args.resume:
        parser.error("argument --out: with --resume RUN the run folder is RUN; omit --out")
    try:
        if args.resume is not None:
            source = args.resume / "config.yaml"
            if not source.is_file():
                return _error(args, f"--resume: {source} not found (not a run folder?)")
            config = load_config(source, args.overrides)
        else:
            config = load_config(args.config, args.overrides)
    except ConfigError as err:
        return _error(args, str(err))
    if args.print_config:
        print(yaml.safe_dump(config_to_dict(config), sort_keys=False), end="")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from smartgrpo_fast.train.trainer import GRPOTrainer

    out = args.resume if args.resume is not None else args.out
    try:
        # Every file, name and prompt is read and checked here, before the first step; the
        # run folder is written last, so a failure leaves nothing behind.
        trainer = GRPOTrainer(config, out, resume=args.resume is not None)
    except (ConfigError, CheckpointError, FileExistsError, FileNotFoundError) as err:
        return _error(args, str(err))
    trainer.train()
    if trainer.dist.main:
        print(f"run: {out}  (metrics: {out / 'metrics.jsonl'}, checkpoints: {out / 'checkpoints'})")
    trainer.shutdown()
    return 0
