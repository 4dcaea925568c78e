"""``smartgrpo-fast eval``: the mean reward of a model, or of its LoRA adapter against the
base model (paired), on fresh prompts."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from smartgrpo_fast import __version__
from smartgrpo_fast.cli import args as cli_args
from smartgrpo_fast.cli import build
from smartgrpo_fast.cli.args import int_in

__all__ = ["add_eval"]


def add_eval(commands: argparse._SubParsersAction) -> None:
    """Register ``eval`` on the top-level sub-command parser."""
    from smartgrpo_fast.train.data import EVAL_PROMPT_SEED
    from smartgrpo_fast.train.evaluate import EvalConfig

    d = EvalConfig()
    p = commands.add_parser(
        "eval",
        help="mean reward of a model (or its LoRA adapter against the base) on fresh prompts",
        description=(
            "Sample each prompt with the ODE from fixed initial noise (Philox, keyed by --seed, "
            "the prompt's index and the image's: the batch size does not change results) and "
            "score the images with --reward. With --lora, the base model and the adapter are "
            "evaluated on the same prompts and noise and compared by a paired t statistic (unless "
            "--no-base). Writes DIR/result.json (config, prompts, reward: one reward per "
            "prompt of the adapter, else of the model, the mean of its --images-per-prompt "
            "images' (reward_images: each image's, when more than one); reward_base when "
            "compared; match and match_rate: all attributes recognised in an image, for "
            "rewards that can tell (tiny); summary: "
            "mean ± std, paired statistics, match rates; seconds), DIR/grid.png (and "
            "grid_base.png when compared)."
        ),
    )
    cli_args.add_model(p)
    p.add_argument("--lora", type=Path, default=None, metavar="PATH",
                   help="a peft adapter folder (models.lora.save_adapter's) or a trainer "
                        "checkpoint RUN/checkpoints/step-N holding one in adapter/, to "
                        "evaluate (default: none, the model alone)")  # fmt: skip
    p.add_argument("--no-base", action="store_true",
                   help="with --lora, evaluate only the adapter (default: the base model too, "
                        "with paired statistics)")  # fmt: skip
    cli_args.add_reward(p)
    cli_args.add_prompts(p, num_default=128, seed_flag="--prompt-seed")
    p.add_argument("--prompt-seed", type=int_in(0, 2**62), default=EVAL_PROMPT_SEED,
                   metavar="S",
                   help="seed of the sampled tiny prompts; the default is the trainer's "
                        "held-out draw (train.data.EVAL_PROMPT_SEED; its training draws use "
                        "seeds >= 2**40) (default: %(default)s)")  # fmt: skip
    cli_args.add_seed(p, d.seed, "keys the initial noise")
    p.add_argument("--steps", type=int_in(1), default=d.steps, metavar="N",
                   help="ODE steps from t = 1 to 0 (default: %(default)s)")  # fmt: skip
    p.add_argument("--shift", type=float, default=None,
                   help="schedule time shift (default: the model's; 3 for tiny, SD3)")  # fmt: skip
    p.add_argument("--images-per-prompt", type=int_in(1), default=d.images_per_prompt,
                   metavar="M",
                   help="images of each prompt, from M noises (image 0's is the same for any "
                        "M); a prompt's reward is their mean, so the paired t measures the "
                        "change of each prompt's expected reward (GenEval samples 4) "
                        "(default: %(default)s)")  # fmt: skip
    cli_args.add_batch(p, "images sampled together (one decode of B rows)",
                       build.batch_rule("B"))  # fmt: skip
    cli_args.add_device(p)
    cli_args.add_progress(p)
    cli_args.add_out(p, "eval_out", "folder for result.json and grid.png")
    p.set_defaults(handler=_run_eval, parser=p)


def _lora(args: argparse.Namespace) -> Path | None:
    """--lora: an adapter folder, or a trainer checkpoint folder holding one in adapter/."""
    parser: argparse.ArgumentParser = args.parser
    lora: Path | None = args.lora
    if lora is not None and not lora.exists():
        parser.error(f"argument --lora: {lora} does not exist")
    if lora is not None and (lora / "adapter" / "adapter_config.json").is_file() \
            and not (lora / "adapter_config.json").exists():  # fmt: skip
        lora = lora / "adapter"
    if args.no_base and lora is None:
        parser.error("argument --no-base: only with --lora")
    return lora


def _run_eval(args: argparse.Namespace) -> int:
    from smartgrpo_fast.search.report import write_result
    from smartgrpo_fast.train.evaluate import (
        EvalConfig,
        evaluate,
        paired_comparison,
        result_dict,
        save_grid,
    )

    parser: argparse.ArgumentParser = args.parser
    lora = args.lora = _lora(args)
    device, dtype, prompts = build.inputs(args)
    try:
        config = EvalConfig(steps=args.steps, seed=args.seed, shift=args.shift,
                            images_per_prompt=args.images_per_prompt)  # fmt: skip
    except ValueError as err:
        parser.error(str(err))
    reward = build.build_reward(args, device)
    model = build.load_model(args, device, dtype, **({"lora": lora} if lora else {}))
    batch = build.resolve_batch(args, model, device, default=config.batch)
    config = replace(config, batch=batch)
    compare = lora is not None and not args.no_base
    m = config.images_per_prompt
    print(f"{len(prompts)} prompts" + (f" x {m} images" if m > 1 else "")
          + f", {config.steps} ODE steps, reward {args.reward}, {device}"
          + (f", adapter {lora}" + (" vs base" if compare else "") if lora else ""),
          file=sys.stderr)  # fmt: skip
    progress = not args.no_progress
    base = None
    if compare:
        from smartgrpo_fast.models.lora import adapter_disabled

        with adapter_disabled(model):
            base = evaluate(model, reward, prompts, config, progress=progress)
    res = evaluate(model, reward, prompts, config, progress=progress)
    cfg = {"model": args.model, "lora": None if lora is None else str(lora),
           "reward": args.reward, "device": device, "dtype": dtype,
           "prompt_seed": args.prompt_seed if args.prompt is None and args.prompts is None
           else None, "model_options": build.model_options(args, model, dtype)}  # fmt: skip
    result = result_dict(res, config, base=base, meta=cfg, extra={"version": __version__})
    out: Path = args.out
    json_path = write_result(result, out / "result.json")
    grids = [save_grid(res.images, out / "grid.png", nrow=res.grid_nrow)]
    if base is not None:
        grids.append(save_grid(base.images, out / "grid_base.png", nrow=base.grid_nrow))
    for name, r in (("base", base), ("adapter" if lora else "model", res)):
        if r is not None:
            rate = "" if r.match_rate is None else f", prompt-match rate {r.match_rate:.1%}"
            rate += " (of the images)" if rate and m > 1 else ""
            bad = f", {r.nonfinite} non-finite left out" if r.nonfinite else ""
            print(f"reward {name:>7}: {r.mean:.4f} ± {r.std:.4f}{rate}{bad}")
    if base is not None:
        s = paired_comparison(res, base)
        t = "nan" if s["t"] != s["t"] else f"{s['t']:.2f}"
        print(f"adapter_vs_base: mean diff {s['mean_diff']:+.4f}, paired t = {t} "
              f"(df {s['df']}), wins {s['win_rate']:.0%}")  # fmt: skip
    print(f"JSON: {json_path}\n" + "\n".join(f"PNG:  {g}" for g in grids))
    return 0
