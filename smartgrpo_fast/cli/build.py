"""What the shared options turn into: the device, prompts, the reward and the model. Every
problem with a user's input is an argument error (``parser.error``: exit status 2)."""

from __future__ import annotations

import argparse
from typing import Any

import torch

__all__ = [
    "build_reward",
    "default_device",
    "inputs",
    "load_model",
    "model_dtype",
    "one_line",
    "read_prompts",
    "resolve_device",
]


def one_line(err: BaseException) -> str:
    """An exception's message on one line."""
    return " ".join(str(err).split())


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(args: argparse.Namespace) -> str:
    """--device, or the default one; an argument error when CUDA is asked for and missing."""
    name = args.device or default_device()
    if name.startswith("cuda") and not torch.cuda.is_available():
        args.parser.error(f"argument --device: {name!r} requested but CUDA is not available")
    return name


def model_dtype(args: argparse.Namespace, device: str) -> str:
    """--dtype, or bfloat16 on CUDA and float32 elsewhere."""
    return args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")


def inputs(args: argparse.Namespace) -> tuple[str, str, list[str]]:
    """(device, model dtype, prompts) of a command that samples a model."""
    device = resolve_device(args)
    prompts = read_prompts(args)
    return device, model_dtype(args, device), prompts


def read_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt, --prompts FILE, or --num-prompts sampled tiny prompts."""
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


def build_reward(args: argparse.Namespace, device: str) -> Any:
    """The reward of --reward."""
    from smartgrpo_fast.rewards import reward_from_spec

    try:
        return reward_from_spec(args.reward, device=device)
    except ValueError as err:
        args.parser.error(str(err))


def load_model(args: argparse.Namespace, device: str, dtype: str, **kwargs: Any) -> Any:
    """--model (``kwargs``: e.g. ``lora``)."""
    from smartgrpo_fast import models

    try:
        return models.load(args.model, device=device, dtype=getattr(torch, dtype), **kwargs)
    except (FileNotFoundError, ValueError) as err:
        args.parser.error(one_line(err))
