"""Argument types and the argument groups the commands share.

Every ``add_*`` function adds one group of options to a sub-command's parser, with help that
names its default; the commands call these instead of repeating the blocks. What the options
turn into (a device, a model, a reward, prompts, a batch size) is :mod:`.build`'s.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "DTYPES",
    "RewardArg",
    "add_batch",
    "add_cem",
    "add_device",
    "add_dtype",
    "add_model",
    "add_out",
    "add_progress",
    "add_prompts",
    "add_reward",
    "add_seed",
    "device",
    "float_above",
    "float_at_least",
    "int_in",
    "reward_arg",
]

#: Model dtypes the commands take.
DTYPES = ("float32", "bfloat16", "float16")
#: The reward of a command's --reward default (the embedded prompt classifier).
DEMO_REWARD = "tiny"
_MODEL_DTYPE_DEFAULT = "bfloat16 on CUDA, float32 on CPU"


def int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
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


def _float_bound(lo: float, strict: bool) -> Callable[[str], float]:
    op = ">" if strict else ">="

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (math.isfinite(value) and (value > lo if strict else value >= lo)):
            raise argparse.ArgumentTypeError(f"expected a finite number {op} {lo:g}, got {text!r}")
        return value

    return parse


def float_at_least(lo: float) -> Callable[[str], float]:
    """argparse type: a finite float >= ``lo``."""
    return _float_bound(lo, strict=False)


def float_above(lo: float) -> Callable[[str], float]:
    """argparse type: a finite float > ``lo``."""
    return _float_bound(lo, strict=True)


def device(text: str) -> str:
    """argparse type of --device: cpu, cuda or cuda:N."""
    name = text.strip().lower()
    head, _, index = name.partition(":")
    if name == "cpu" or (head == "cuda" and (not index or index.isdigit())):
        return name
    raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")


class RewardArg(NamedTuple):
    """One ``--reward-arg NAME.KEY=VALUE``: VALUE read as YAML (numbers, true/false, null;
    anything else stays a string)."""

    name: str
    key: str
    value: Any
    text: str


def reward_arg(text: str) -> RewardArg:
    """argparse type of --reward-arg: ``NAME.KEY=VALUE``."""
    import yaml

    target, sep, raw = text.partition("=")
    name, dot, key = target.strip().rpartition(".")
    name, key = name.strip(), key.strip()
    if not (sep and dot and name and key.isidentifier()):
        raise argparse.ArgumentTypeError(
            f"expected NAME.KEY=VALUE (e.g. imagereward.checkpoint=PATH), got {text!r}"
        )
    if key == "device":
        raise argparse.ArgumentTypeError(f"{text!r}: the reward's device is set by --device")
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw
    return RewardArg(name, key, value, text)


# ------------------------------------------------------------------------------ groups


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=device, default=None,
                   help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")  # fmt: skip


def add_dtype(
    p: argparse.ArgumentParser,
    *,
    what: str = "model dtype",
    choices: tuple[str, ...] = DTYPES,
    default: str | None = None,
) -> None:
    shown = "%(default)s" if default is not None else _MODEL_DTYPE_DEFAULT
    p.add_argument("--dtype", choices=choices, default=default,
                   help=f"{what} (default: {shown})")  # fmt: skip


def add_out(p: argparse.ArgumentParser, default: str, what: str, *, metavar: str = "DIR") -> None:
    p.add_argument("--out", type=Path, default=Path(default), metavar=metavar,
                   help=f"{what} (default: %(default)s)")  # fmt: skip


def add_seed(p: argparse.ArgumentParser, default: int, what: str, *, hi: int = 2**62) -> None:
    p.add_argument("--seed", type=int_in(0, hi), default=default, metavar="S",
                   help=f"{what} (default: %(default)s)")  # fmt: skip


def add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar on stderr (default: shown)")  # fmt: skip


def add_batch(p: argparse.ArgumentParser, what: str, default: str) -> None:
    p.add_argument("--batch", type=int_in(1), default=None, metavar="B",
                   help=f"{what} (default: {default.replace('%', '%%')})")  # fmt: skip


def add_cem(p: argparse.ArgumentParser, k: int, rounds: int, top: int) -> None:
    """--k, --rounds and --top of a CEM search."""
    p.add_argument("--k", type=int_in(1), default=k,
                   help="candidates per round (K; default: %(default)s)")  # fmt: skip
    p.add_argument("--rounds", type=int_in(1), default=rounds,
                   help="CEM rounds (N; default: %(default)s)")  # fmt: skip
    p.add_argument("--top", type=int_in(1), default=top,
                   help="elites per round (T <= K; default: %(default)s)")  # fmt: skip


def add_model(p: argparse.ArgumentParser) -> None:
    """--model and the options of how it is loaded (SD3 resolution, guidance, backend)."""
    from smartgrpo_fast.graphs import BACKENDS

    p.add_argument("--model", default="tiny",
                   help="tiny (embedded) or a StableDiffusion3Pipeline folder / cached repo id "
                        "(default: %(default)s)")  # fmt: skip
    p.add_argument("--resolution", type=int_in(1), default=None, metavar="PX",
                   help="SD3 image side in pixels, a multiple of the VAE factor times the patch "
                        "size (16 for SD3/SD3.5; Flow-GRPO trains at 512) (default: the "
                        "model's, 1024 for SD3/SD3.5)")  # fmt: skip
    p.add_argument("--guidance", type=float_at_least(1.0), default=None, metavar="W",
                   help="classifier-free guidance scale, >= 1; 1 = off, > 1 doubles every "
                        "forward's rows (default: the model's: tiny's config.json, SD3 "
                        "off)")  # fmt: skip
    p.add_argument("--backend", choices=BACKENDS, default="eager",
                   help="how the transformer forward runs: eager, graph (CUDA graphs per "
                        "batch bucket; eager with a warning off CUDA) or a torch.compile "
                        "mode (default: %(default)s)")  # fmt: skip
    add_dtype(p)


def add_reward(
    p: argparse.ArgumentParser,
    example: str = "",
    *,
    default: str | None = DEMO_REWARD,
    default_text: str = "%(default)s",
) -> None:
    """--reward and --reward-arg (``default_text`` says what a None ``default`` means)."""
    p.add_argument("--reward", default=default, metavar="NAME[:WEIGHT],...",
                   help=f"reward, or a weighted sum of rewards by name{example}; names: see "
                        f"smartgrpo_fast.rewards.NAMES (default: {default_text})")  # fmt: skip
    p.add_argument("--reward-arg", type=reward_arg, action="append", default=[],
                   metavar="NAME.KEY=VALUE",
                   help="a keyword argument of the loader of reward NAME of --reward, VALUE "
                        "read as YAML (repeatable; e.g. imagereward.checkpoint=PATH, "
                        "imagereward.med_config=PATH, aesthetic.head=PATH, "
                        "imagereward.dtype=bfloat16) (default: none: checkpoints from the "
                        "Hugging Face cache)")  # fmt: skip


def add_prompts(p: argparse.ArgumentParser, *, num_default: int, seed_flag: str) -> None:
    """--prompt, --prompts FILE or --num-prompts N (mutually exclusive)."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", metavar="TEXT",
                     help="a prompt (repeatable; default: none)")  # fmt: skip
    src.add_argument("--prompts", type=Path, metavar="FILE",
                     help="a text file, one prompt per line (blank lines and #-comments "
                          "skipped; default: none)")  # fmt: skip
    src.add_argument("--num-prompts", type=int_in(1), default=None, metavar="N",
                     help="N prompts sampled from the embedded world with "
                          f"{seed_flag} (default: {num_default} with --model tiny and no prompts "
                          "given; another model needs prompts or an explicit N)")  # fmt: skip
    p.set_defaults(num_prompts_default=num_default)
