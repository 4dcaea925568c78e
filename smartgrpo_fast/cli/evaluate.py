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
from smartgrpo_fast.cli.args import DEMO_REWARD as DEMO
from smartgrpo_fast.cli.args import RewardArg, int_in

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
            "mean ± std, paired statistics, match rates; judge: the same for the --judge "
            "reward on the same images; seconds), DIR/grid.png (and "
            "grid_base.png when compared). With --run RUN (or a trainer checkpoint "
            "RUN/checkpoints/step-N as --lora) the model, its options and the reward with its "
            "arguments default to the run's, so the adapter is judged by the reward it was "
            "trained on; the prompts, noise and sampler stay this command's."
        ),
    )
    p.add_argument("--run", type=Path, default=None, metavar="RUN",
                   help="a trainer run folder: evaluate the adapter of its newest complete "
                        "checkpoint (or --lora's) with the run's model, resolution, guidance, "
                        "dtype and reward (with its reward_args) unless given here "
                        "(default: none)")  # fmt: skip
    cli_args.add_model(p)
    p.add_argument("--lora", type=Path, default=None, metavar="PATH",
                   help="a peft adapter folder (models.lora.save_adapter's) or a trainer "
                        "checkpoint RUN/checkpoints/step-N holding one in adapter/, to "
                        "evaluate (default: none, the model alone)")  # fmt: skip
    p.add_argument("--no-base", action="store_true",
                   help="with --lora, evaluate only the adapter (default: the base model too, "
                        "with paired statistics)")  # fmt: skip
    cli_args.add_reward(p)
    p.add_argument("--judge", default="auto", metavar="NAME",
                   help="a second reward scoring the same images, reported beside --reward in "
                        "result.json's judge: auto = shapes-judge (the embedded world's "
                        "analytic judge: the share of the prompt's shape, colour and background "
                        "the image shows) for the tiny model unless --reward is it, else none; "
                        "none; or a reward name (default: %(default)s)")  # fmt: skip
    for action in p._actions:  # None = not given: --run / a run's checkpoint may fill them
        if action.dest in ("model", "reward"):
            plain = "tiny" if action.dest == "model" else DEMO
            action.default = None
            action.help = action.help.replace(
                "(default: %(default)s)", f"(default: the run's with --run, else {plain})"
            )
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


def _checkpoint_run(lora: Path | None) -> Path | None:
    """The run folder of a trainer checkpoint RUN/checkpoints/step-N (or its adapter/), when
    it holds a config.yaml; else None."""
    if lora is None:
        return None
    step = lora.parent if lora.name in ("adapter", "adapter_ema") else lora
    run = step.parent.parent
    if step.parent.name == "checkpoints" and (run / "config.yaml").is_file():
        return run
    return None


def _run_defaults(args: argparse.Namespace) -> Path | None:
    """Fill what was not given from the run (``--run RUN``, or the run of a trainer
    checkpoint given as ``--lora``): the checkpoint (the newest complete one), the model and
    its options, the reward and its arguments. Returns the run folder, or None."""
    from smartgrpo_fast.train.checkpoint import latest_checkpoint
    from smartgrpo_fast.train.config import ConfigError, load_config

    parser: argparse.ArgumentParser = args.parser
    run: Path | None = args.run
    flag = "--run" if run is not None else "--lora"
    if run is None:
        run = _checkpoint_run(args.lora)
    if run is None:
        args.model = args.model or "tiny"
        args.reward = args.reward or DEMO
        return None
    if not (run / "config.yaml").is_file():
        parser.error(f"argument --run: {run / 'config.yaml'} not found (not a run folder?)")
    try:
        cfg = load_config(run / "config.yaml")
    except ConfigError as err:
        parser.error(f"argument {flag}: {run / 'config.yaml'}: {build.one_line(err)}")
    if cfg.lora is None:
        parser.error(f"argument {flag}: {run} trained the whole transformer (lora: null); "
                     "eval reads LoRA adapters")  # fmt: skip
    if args.lora is None:
        found = latest_checkpoint(run)
        if found is None:
            parser.error(f"argument --run: {run} has no complete checkpoint")
        args.lora = found[1]
    m = cfg.model
    args.model = args.model or m.name
    if args.model == m.name:  # the run's model: its options unless given
        if args.resolution is None and m.name != "tiny":
            args.resolution = m.resolution
        if args.guidance is None:
            args.guidance = m.guidance_scale
        if args.dtype is None:
            args.dtype = m.dtype
    if args.reward is None:
        args.reward = cfg.reward
        given = {(a.name, a.key) for a in args.reward_arg}
        from smartgrpo_fast.rewards import check_names

        for name in check_names(cfg.reward):
            for key, value in cfg.reward_args.items():
                if (name, key) not in given:
                    args.reward_arg.append(RewardArg(name, key, value, f"{name}.{key}={value}"))
    return run


def _judge(args: argparse.Namespace, device: str) -> tuple[str | None, object]:
    """(name, reward) of --judge, or (None, None)."""
    from smartgrpo_fast import rewards

    name = args.judge
    if name == "auto":
        name = "shapes-judge" if args.model == "tiny" and args.reward != "shapes-judge" else None
    elif name == "none":
        name = None
    if name is None:
        return None, None
    try:
        rewards.check_names(name)
        return name, rewards.load(name, device=device)
    except (ValueError, FileNotFoundError) as err:
        args.parser.error(f"argument --judge: {build.one_line(err)}")


def _run_eval(args: argparse.Namespace) -> int:
    from smartgrpo_fast.search.report import write_result
    from smartgrpo_fast.train.evaluate import (
        EvalConfig,
        evaluate,
        paired_comparison,
        rescore,
        result_dict,
        save_grid,
    )

    parser: argparse.ArgumentParser = args.parser
    if args.run is not None and not args.run.is_dir():
        parser.error(f"argument --run: {args.run} is not a folder")
    if args.lora is not None and not args.lora.exists():
        parser.error(f"argument --lora: {args.lora} does not exist")
    run = _run_defaults(args)
    lora = args.lora = _lora(args)
    device, dtype, prompts = build.inputs(args)
    try:
        config = EvalConfig(steps=args.steps, seed=args.seed, shift=args.shift,
                            images_per_prompt=args.images_per_prompt)  # fmt: skip
    except ValueError as err:
        parser.error(str(err))
    reward = build.build_reward(args, device)
    judge_name, judge = _judge(args, device)  # before the model: a bad name fails fast
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
           "run": None if run is None else str(run), "reward": args.reward,
           "reward_args": {f"{a.name}.{a.key}": a.value for a in args.reward_arg},
           "judge": judge_name, "device": device, "dtype": dtype,
           "prompt_seed": args.prompt_seed if args.prompt is None and args.prompts is None
           else None, "model_options": build.model_options(args, model, dtype)}  # fmt: skip
    extra: dict = {"version": __version__}
    judged = judged_base = None
    if judge is not None:
        judged = rescore(res, judge, batch=config.batch)
        judged_base = None if base is None else rescore(base, judge, batch=config.batch)
        jd = result_dict(judged, config, base=judged_base)
        extra["judge"] = {"name": judge_name, **{k: v for k, v in jd.items()
                                                 if k not in ("config", "prompts")}}  # fmt: skip
    result = result_dict(res, config, base=base, meta=cfg, extra=extra)
    out: Path = args.out
    json_path = write_result(result, out / "result.json")
    grids = [save_grid(res.images, out / "grid.png", nrow=res.grid_nrow)]
    if base is not None:
        grids.append(save_grid(base.images, out / "grid_base.png", nrow=base.grid_nrow))
    scored = [(args.reward, res, base)]
    if judged is not None:
        scored.append((f"{judge_name} (judge)", judged, judged_base))
    for what, r_model, r_base in scored:
        print(f"-- {what}")
        for name, r in (("base", r_base), ("adapter" if lora else "model", r_model)):
            if r is not None:
                rate = "" if r.match_rate is None else f", prompt-match rate {r.match_rate:.1%}"
                rate += " (of the images)" if rate and m > 1 else ""
                bad = f", {r.nonfinite} non-finite left out" if r.nonfinite else ""
                print(f"reward {name:>7}: {r.mean:.4f} ± {r.std:.4f}{rate}{bad}")
        if r_base is not None:
            s = paired_comparison(r_model, r_base)
            t = "nan" if s["t"] != s["t"] else f"{s['t']:.2f}"
            print(f"adapter_vs_base: mean diff {s['mean_diff']:+.4f}, paired t = {t} "
                  f"(df {s['df']}), wins {s['win_rate']:.0%}")  # fmt: skip
    print(f"JSON: {json_path}\n" + "\n".join(f"PNG:  {g}" for g in grids))
    return 0
