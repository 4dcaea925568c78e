"""What the shared options turn into: the device, prompts, the reward, the model and the
batch size. Every problem with a user's input is an argument error (``parser.error``: exit
status 2, one line naming the argument or the file, no traceback)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from smartgrpo_fast.cli.args import RewardArg
from smartgrpo_fast.rewards import reward_dtype

__all__ = [
    "CPU_ROWS",
    "DECODE_BYTES_PER_PIXEL",
    "FORWARD_BYTES_PER_PIXEL",
    "MAX_BATCH",
    "MEMORY_FRACTION",
    "batch_rule",
    "build_reward",
    "check_model_path",
    "default_batch",
    "default_device",
    "fitting_rows",
    "inputs",
    "load_model",
    "model_dtype",
    "model_options",
    "one_line",
    "read_prompts",
    "resolve_batch",
    "resolve_device",
]

#: Estimated peak bytes per image pixel of one row of the float32 SD3 VAE decode: its widest
#: layers hold 256 float32 channels at the full resolution, about three such tensors at once.
DECODE_BYTES_PER_PIXEL = 3 * 256 * 4
#: Estimated peak bytes per image pixel of one transformer row (SD3.5-medium in bf16: about
#: 4.3k tokens x 60 kB of activations per token at 1024 px); guidance runs two rows per row.
FORWARD_BYTES_PER_PIXEL = 256
#: The share of the free CUDA memory (measured after loading the model and the reward) that
#: the rows of one forward and one decode may take.
MEMORY_FRACTION = 0.8
#: Rows (B*K) of one forward off CUDA: a conservative fixed cap.
CPU_ROWS = 16
#: The largest default batch (RolloutConfig's and EvalConfig's default batch).
MAX_BATCH = 32


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
    """(device, model dtype, prompts) of a command that samples a model; a --model path that
    does not exist is an argument error here, before anything slow is loaded."""
    device = resolve_device(args)
    prompts = read_prompts(args)
    check_prompts(args, prompts)
    check_model_path(args)
    return device, model_dtype(args, device), prompts


def check_prompts(args: argparse.Namespace, prompts: list[str]) -> None:
    """Prompts the model or the reward cannot read (the embedded world's grammar for ``tiny``)
    are an argument error of --prompt / --prompts, before anything is loaded."""
    from smartgrpo_fast import models, rewards

    given = "--prompt" if args.prompt else "--prompts" if args.prompts is not None else None
    if given is None:  # sampled from the embedded world: readable by construction
        return
    spec = getattr(args, "reward", None)
    try:
        rewards.check_names(spec or "tiny")
    except ValueError:
        spec = None  # --reward's own error comes when the reward is built
    try:
        models.check_prompts(args.model, prompts)
        if spec:
            rewards.check_prompts(spec, prompts)
    except ValueError as err:
        args.parser.error(f"argument {given}: {one_line(err)}")


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
    n = args.num_prompts
    if n is None:
        if args.model != "tiny":
            parser.error("give --prompt, --prompts or --num-prompts for a model other than tiny")
        n = args.num_prompts_default
    from smartgrpo_fast.shapes import sample_prompts

    return sample_prompts(n, getattr(args, "prompt_seed", args.seed))


# ------------------------------------------------------------------------------ reward


def _reward_kwargs(
    parser: argparse.ArgumentParser, spec: str, names: list[str], given: list[RewardArg]
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {name: {} for name in names}
    for arg in given:
        if arg.name not in out:
            parser.error(f"argument --reward-arg: {arg.text!r}: {arg.name!r} is not a reward "
                         f"of --reward {spec!r}")  # fmt: skip
        if arg.key in out[arg.name]:
            parser.error(f"argument --reward-arg: {arg.name}.{arg.key} given twice")
        value = arg.value
        if arg.key == "dtype":  # the names a config's reward_args take (rewards.DTYPES)
            try:
                value = reward_dtype(value)
            except ValueError as err:
                parser.error(f"argument --reward-arg: {arg.text!r}: {one_line(err)}")
        out[arg.name][arg.key] = value
    return out


def build_reward(args: argparse.Namespace, device: str) -> Any:
    """The reward of --reward, each component loaded with its --reward-arg keywords."""
    from smartgrpo_fast.rewards import check_names, load
    from smartgrpo_fast.rewards.combine import WeightedSum

    parser: argparse.ArgumentParser = args.parser
    try:
        weights = check_names(args.reward)
    except ValueError as err:
        parser.error(f"argument --reward: {one_line(err)}")
    kwargs = _reward_kwargs(parser, args.reward, list(weights), args.reward_arg)
    rewards = {}
    for name, kw in kwargs.items():
        try:
            rewards[name] = load(name, device=device, **kw)
        except FileNotFoundError as err:
            parser.error(f"argument --reward: {name}: {one_line(err)} (the loader's KEY=PATH "
                         f"arguments: --reward-arg {name}.KEY=PATH)")  # fmt: skip
        except ValueError as err:
            parser.error(f"argument --reward: {name}: {one_line(err)}")
        except TypeError as err:
            if not kw:
                raise
            bad = [k for k in kw if f"unexpected keyword argument '{k}'" in str(err)]
            what = f"does not take {bad[0]!r}" if bad else "rejects its arguments"
            parser.error(f"argument --reward-arg: reward {name!r} {what} ({one_line(err)})")
    if len(weights) == 1 and next(iter(weights.values())) == 1.0:
        return next(iter(rewards.values()))
    try:
        return WeightedSum(weights, rewards=rewards)
    except ValueError as err:
        parser.error(f"argument --reward: {one_line(err)}")


# ------------------------------------------------------------------------------- model


def check_model_path(args: argparse.Namespace) -> None:
    """A --model given as a path (starting with ``.``, ``/`` or ``~``) must exist: checked
    before anything slow is loaded."""
    name = str(args.model)
    if name != "tiny" and name.startswith((".", "/", "~")):
        path = Path(name).expanduser()
        if not path.exists():
            args.parser.error(f"argument --model: {path}: no such folder")


def load_model(args: argparse.Namespace, device: str, dtype: str, **kwargs: Any) -> Any:
    """--model with --resolution, --guidance and --backend (``kwargs``: e.g. ``lora``,
    ``preview_decoder``: SD3 only, None is left out; its errors name --preview-decoder)."""
    from smartgrpo_fast import models
    from smartgrpo_fast.graphs import GraphConfig

    parser: argparse.ArgumentParser = args.parser
    check_model_path(args)
    preview = kwargs.pop("preview_decoder", None)
    if preview is not None:
        if args.model == "tiny":
            parser.error("argument --preview-decoder: only for SD3 models (the embedded model "
                         "decodes nothing: it works in pixel space)")  # fmt: skip
        kwargs["preview_decoder"] = preview
    graph = GraphConfig(backend=args.backend)
    kw: dict[str, Any] = {"device": device, "dtype": getattr(torch, dtype), **kwargs}
    if args.model == "tiny":
        if args.resolution is not None:
            parser.error("argument --resolution: only for SD3 models (the embedded model's "
                         "image size is fixed)")  # fmt: skip
        kw["graph"] = graph
        if args.guidance is not None:
            kw["guidance_scale"] = args.guidance
    else:
        from smartgrpo_fast.models.sd3 import SD3Config

        kw["config"] = SD3Config(
            guidance_scale=1.0 if args.guidance is None else args.guidance,
            graph=graph,
            resolution=args.resolution,
        )
    try:
        return models.load(args.model, **kw)
    except (FileNotFoundError, ValueError) as err:
        if preview is not None and str(Path(preview).expanduser()) in str(err):
            parser.error(f"argument --preview-decoder: {one_line(err)}")
        parser.error(one_line(err))


def model_options(args: argparse.Namespace, model: Any, dtype: str) -> dict[str, Any]:
    """How the model ran, for result.json."""
    options = {"resolution": getattr(model, "image_size", None),
               "guidance": model.guidance_scale, "backend": args.backend, "dtype": dtype,
               "reward_args": [a.text for a in args.reward_arg]}  # fmt: skip
    preview = getattr(args, "preview_decoder", None)
    if preview is not None:
        options["preview_decoder"] = str(preview)
    search_dtype = getattr(args, "search_dtype", "model")
    if search_dtype != "model":
        options["search_dtype"] = search_dtype
    return options


# ------------------------------------------------------------------------------- batch


def fitting_rows(image_side: int, free_bytes: int | None, *, guidance: bool = False) -> int:
    """Rows (of a forward and of a decode) of an ``image_side`` px SD3 image that fit in
    ``MEMORY_FRACTION * free_bytes`` by the estimate of :func:`batch_rule`; ``free_bytes``
    None (off CUDA): :data:`CPU_ROWS`."""
    if image_side < 1:
        raise ValueError(f"image_side: expected >= 1, got {image_side}")
    if free_bytes is None:
        return CPU_ROWS
    forward = FORWARD_BYTES_PER_PIXEL * (2 if guidance else 1)
    per_row = image_side**2 * (DECODE_BYTES_PER_PIXEL + forward)
    return int(MEMORY_FRACTION * max(free_bytes, 0)) // per_row


def batch_rule(rows: str = "B*K") -> str:
    """The default batch's rule in words, for --help (``rows``: the rows of a batch)."""
    return (
        f"{MAX_BATCH} for tiny; for an SD3 model the largest B <= {MAX_BATCH} whose {rows} rows "
        f"fit in {MEMORY_FRACTION:.0%} of the free CUDA memory after loading, at an estimated "
        f"{DECODE_BYTES_PER_PIXEL} bytes per image pixel and row for the float32 VAE decode "
        f"plus {FORWARD_BYTES_PER_PIXEL} per transformer row (twice with guidance); off CUDA "
        f"{rows} <= {CPU_ROWS}; at least 1"
    )


def default_batch(
    k: int,
    image_side: int,
    free_bytes: int | None,
    *,
    guidance: bool = False,
    cap: int = MAX_BATCH,
) -> int:
    """The default batch B of an SD3 model (:func:`batch_rule`): the largest B <= ``cap``
    whose B*K rows fit (:func:`fitting_rows`), at least 1."""
    if k < 1 or cap < 1:
        raise ValueError(f"k, cap: expected >= 1, got {k}, {cap}")
    return max(1, min(cap, fitting_rows(image_side, free_bytes, guidance=guidance) // k))


def resolve_batch(
    args: argparse.Namespace, model: Any, device: str, *, k: int = 1, default: int = MAX_BATCH
) -> int:
    """--batch; else ``default`` for tiny, :func:`default_batch` (capped at ``default``) for an
    SD3 model, noted on stderr."""
    if args.batch is not None:
        return args.batch
    if args.model == "tiny":
        return default
    free = torch.cuda.mem_get_info(torch.device(device))[0] if device.startswith("cuda") else None
    guidance = model.guidance_scale > 1.0
    batch = default_batch(k, model.image_size, free, guidance=guidance, cap=default)
    where = "off CUDA" if free is None else f"{free / 2**30:.1f} GiB free"
    note = f"note: --batch {batch}: {batch * k} rows of {model.image_size} px ({where})"
    if fitting_rows(model.image_size, free, guidance=guidance) < batch * k:
        note += "; more than the memory estimate allows: lower --k or --resolution if it runs out"
    print(note, file=sys.stderr)
    return batch
