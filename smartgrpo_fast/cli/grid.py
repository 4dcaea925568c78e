"""``smartgrpo-fast grid``: an image grid of the embedded model (prompts x seeds)."""

from __future__ import annotations

import argparse
from pathlib import Path

from smartgrpo_fast.cli import args as cli_args
from smartgrpo_fast.cli import build
from smartgrpo_fast.cli.args import int_in

__all__ = ["add_grid"]


def add_grid(commands: argparse._SubParsersAction) -> None:
    """Register ``grid`` on the top-level sub-command parser."""
    p = commands.add_parser(
        "grid",
        help="image grid of the embedded model (prompts x seeds)",
        description="Sample the embedded model with the ODE from the initial noise of seeds "
        "0 .. --seeds - 1 and write a PNG: one row per sampled prompt, one column per seed.",
    )
    p.add_argument("--prompts", type=int_in(1), default=6, metavar="N",
                   help="number of sampled prompts (default: %(default)s)")  # fmt: skip
    p.add_argument("--prompt-seed", type=int_in(0), default=0, metavar="S",
                   help="seed of the sampled prompts (default: %(default)s)")  # fmt: skip
    p.add_argument("--seeds", type=int_in(1), default=6, metavar="N",
                   help="initial noises per prompt (default: %(default)s)")  # fmt: skip
    p.add_argument("--steps", type=int_in(1), default=40, metavar="N",
                   help="ODE steps (default: %(default)s)")  # fmt: skip
    p.add_argument("--weights", type=Path, default=None, metavar="DIR",
                   help="a weights folder (config.json, flow.safetensors) written by "
                        "python -m smartgrpo_fast.shapes.train_model "
                        "(default: the shipped weights)")  # fmt: skip
    cli_args.add_device(p)
    cli_args.add_out(p, "tiny_grid.png", "the PNG to write", metavar="PNG")
    p.set_defaults(handler=_run_grid, parser=p)


def _run_grid(args: argparse.Namespace) -> int:
    from smartgrpo_fast.shapes import TinyFlowModel, sample_prompts
    from smartgrpo_fast.shapes.grid import generate, save_grid

    device = build.resolve_device(args)
    try:
        model = TinyFlowModel.from_pretrained(args.weights, device=device)
    except (FileNotFoundError, ValueError) as err:
        args.parser.error(f"argument --weights: {build.one_line(err)}")
    prompts = sample_prompts(args.prompts, args.prompt_seed)
    images = generate(model, prompts, list(range(args.seeds)), steps=args.steps)
    print(save_grid(images, prompts, args.out))
    return 0
