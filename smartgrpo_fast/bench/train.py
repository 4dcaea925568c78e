"""``bench train``: where the wall time of GRPO steps goes, and the trainer's own overhead.

Runs ``steps`` optimizer steps of a config (eval and checkpoints off) with every model call
timed (device-synchronised): transformer forwards (rollout and training forwards), backward
passes, decodes, reward calls, and each noise search as a whole (its own forwards, decodes,
rewards and fused ops, or its captured CUDA graph: ``bench search`` splits it). Everything else
in ``time_step`` is the trainer's own overhead: Python, tensor bookkeeping, advantages, the
optimizer step. One row per step and quantity goes to CSV/JSON (``bench_out/train_*.csv``)
through the benchmarks' writers (:mod:`smartgrpo_fast.bench.rows`).

Inside the search, an SD3 model's candidate decodes (``model.decode_preview``: its preview
decoder, ``model.preview_decoder``, when it has one, else the VAE) are also timed, as
``call_preview_decode``: a part of ``call_search``, not a call of its own (the overhead does
not subtract it twice). It is measured only when the search's rounds run stage by stage (a
CPU, or ``search.graph=false``: then a synchronisation before and after each decode); rounds
replayed from a captured CUDA graph run no Python, and the table says so: compare
``call_search`` with and without ``model.preview_decoder`` there. The rollouts' final images
always go through the VAE, as ``call_decode``.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from smartgrpo_fast.bench.rows import ordered_row, write_csv, write_json
from smartgrpo_fast.bench.runinfo import collect_run_info
from smartgrpo_fast.bench.timing import summarize
from smartgrpo_fast.devices import is_capturing

__all__ = ["CallTimers", "TimedReward", "format_train_table", "run_train_bench"]

#: What a step is split into: the trainer's stages, then the model calls inside them.
STAGES = ("time_search", "time_rollout", "time_reward", "time_update")
CALLS = ("forward", "backward", "decode", "reward", "search")
#: Calls timed inside another (already in its time): the search's candidate decodes.
INNER = ("preview_decode",)


class CallTimers:
    """Seconds spent in each kind of model call (synchronised on CUDA)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = dict.fromkeys(CALLS, 0.0)
        #: Seconds of the :data:`INNER` calls (inside an outer call, counted there too).
        self.inner = dict.fromkeys(INNER, 0.0)
        self._depth = 0

    @contextlib.contextmanager
    def timed(self, kind: str) -> Iterator[None]:
        """Time the block as ``kind`` (nested blocks count once, in the outermost kind). Never
        synchronises inside a CUDA graph capture (that would break the capture)."""
        sync = self.device.type == "cuda" and not is_capturing(self.device)
        self._depth += 1
        outer = self._depth == 1
        try:
            if outer and sync:
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            yield
            if outer and sync:
                torch.cuda.synchronize(self.device)
            if outer:
                self.seconds[kind] += time.perf_counter() - t0
        finally:
            self._depth -= 1

    @contextlib.contextmanager
    def timed_inner(self, kind: str) -> Iterator[None]:
        """Time the block as the :data:`INNER` ``kind`` whatever encloses it (synchronised
        on CUDA); nothing is timed during a CUDA graph capture."""
        if is_capturing(self.device):
            yield
            return
        sync = self.device.type == "cuda"
        if sync:
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        yield
        if sync:
            torch.cuda.synchronize(self.device)
        self.inner[kind] += time.perf_counter() - t0

    def wrap(self, kind: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        timed = self.timed_inner if kind in INNER else self.timed

        def timed_call(*args: Any, **kwargs: Any) -> Any:
            with timed(kind):
                return fn(*args, **kwargs)

        return timed_call

    def reset(self) -> None:
        self.seconds = dict.fromkeys(CALLS, 0.0)
        self.inner = dict.fromkeys(INNER, 0.0)


class TimedReward:
    """A reward whose calls (``__call__``, ``prepare``, ``score``, ``matches``) are timed."""

    def __init__(self, reward: Any, timers: CallTimers) -> None:
        self.reward = reward
        self.timers = timers
        for name in ("prepare", "score", "matches"):
            if callable(getattr(reward, name, None)):
                setattr(self, name, timers.wrap("reward", getattr(reward, name)))

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        with self.timers.timed("reward"):
            return self.reward(images, prompts)


def run_train_bench(
    config: Any, *, steps: int = 3, warmup: int = 1, progress: bool = True
) -> list[dict]:
    """Time ``warmup + steps`` GRPO steps of ``config`` (a RunConfig); rows of the measured
    steps: per step, each stage and each call kind in seconds, and the overhead fraction."""
    from dataclasses import replace

    from smartgrpo_fast.train.trainer import (
        GRPOTrainer,
        build_model,
        build_reward,
        resolve_device,
    )

    cfg = replace(
        config,
        train=replace(config.train, steps=warmup + steps, async_reward=False),
        eval=replace(config.eval, every=0),
        log=replace(config.log, tensorboard=False, progress=False),
    )
    device = resolve_device(cfg.device)
    timers = CallTimers(device)
    model = build_model(cfg, device)
    model._forward = timers.wrap("forward", model._forward)
    model.decode = timers.wrap("decode", model.decode)
    preview = callable(getattr(model, "decode_preview", None))
    if preview:  # the search's candidates (SD3): the preview decoder, or the VAE without one
        model.decode_preview = timers.wrap("preview_decode", model.decode_preview)
    reward = TimedReward(build_reward(cfg, device), timers)
    info = collect_run_info(device)
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        trainer = GRPOTrainer(cfg, Path(tmp) / "run", model=model, reward=reward)
        trainer.backward_timer = lambda: timers.timed("backward")
        if trainer.searcher is not None:
            trainer.searcher.run = timers.wrap("search", trainer.searcher.run)
            scorer = trainer.search_model
            if scorer is not model:  # a float8 copy (model.search_dtype): its own calls
                scorer._forward = timers.wrap("forward", scorer._forward)
                if preview:
                    scorer.decode_preview = timers.wrap("preview_decode", scorer.decode_preview)
        it = range(warmup + steps)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc="bench train", unit="step")
        try:
            replays = 0
            for i in it:
                timers.reset()
                before = _replays(trainer.searcher)
                line = trainer.train_step()
                if i < warmup:
                    continue
                replays += _replays(trainer.searcher) - before
                values = {k: line[k] for k in (*STAGES, "time_step", "peak_mem_bytes")}
                # the update's view of the rollouts: model rows a rollout made, and how far
                # the training forward's log-probabilities are from the sampled ones
                values |= {k: float(line[k]) for k in ("model_calls_per_rollout",
                                                        "logp_diff_max")}  # fmt: skip
                values |= {f"call_{k}": v for k, v in timers.seconds.items()}
                if preview:
                    values["call_preview_decode"] = timers.inner["preview_decode"]
                values["overhead"] = line["time_step"] - sum(timers.seconds.values())
                values["overhead_frac"] = values["overhead"] / line["time_step"]
                for metric, value in values.items():
                    samples.setdefault(metric, []).append(value)
        finally:
            trainer.close()
        estimate = trainer.memory_estimate
    base = {
        "op": "grpo_step", "provider": cfg.noise, "mode": "train", "x_name": "rollouts",
        "x": cfg.sample.prompts_per_step * cfg.sample.group_size, "k": cfg.search.k,
        "latent": "x".join(map(str, model.latent_shape)), "elites": cfg.search.top,
        "dtype": cfg.model.dtype, "repeats": steps,
        **info.as_row(),
    }  # fmt: skip
    if estimate is not None:
        samples["estimated_peak_bytes"] = [float(estimate.peak)]
    if preview and trainer.searcher is not None:
        # rounds replayed from a captured graph ran no Python: their decodes are not timed
        samples["search_rounds_replayed"] = [float(replays)]
    rows = []
    for metric, values in samples.items():
        unit = _UNITS.get(metric, "s")
        t = summarize(values)
        stats = {"metric": metric, "unit": unit, "median": t.median, "p20": t.p20, "p80": t.p80}
        rows.append(ordered_row(base | stats))
    return rows


#: Units of the rows that are not seconds.
_UNITS = {
    "overhead_frac": "fraction",
    "peak_mem_bytes": "bytes",
    "estimated_peak_bytes": "bytes",
    "search_rounds_replayed": "count",
    "model_calls_per_rollout": "rows",
    "logp_diff_max": "nats",
}


def _replays(searcher: Any) -> int:
    stats = getattr(searcher, "graph_stats", None)
    return int(getattr(stats, "replays", 0))


def format_train_table(rows: Sequence[dict]) -> str:
    """Median over the measured steps of each quantity, with its share of the step."""
    med = {r["metric"]: float(r["median"]) for r in rows}
    step = med["time_step"]
    lines = [f"{'quantity':<16} {'median s':>10} {'of step':>8}"]
    for metric in (*STAGES, *(f"call_{c}" for c in CALLS), "overhead", "time_step"):
        lines.append(f"{metric:<16} {med[metric]:>10.3f} {med[metric] / step:>8.1%}")
        if metric == "call_search" and "call_preview_decode" in med:
            v = med["call_preview_decode"]
            note = "of call_search: the search's candidate decodes"
            if med.get("search_rounds_replayed", 0) > 0:
                note += " (rounds replayed from a CUDA graph: not timed)"
            lines.append(f"{'  preview_decode':<16} {v:>10.3f} {v / step:>8.1%}  {note}")
    lines.append(f"{'overhead_frac':<16} {med['overhead_frac']:>10.3f}")
    if "model_calls_per_rollout" in med:
        lines.append(f"{'model rows':<16} {med['model_calls_per_rollout']:>10.1f} a rollout "
                     "(sampling + search, less the reused velocities)")  # fmt: skip
        lines.append(f"{'logp_diff_max':<16} {med['logp_diff_max']:>10.2e} (training forward "
                     "vs sampled log-probabilities, before the update)")  # fmt: skip
    lines.append(f"{'peak memory':<16} {med['peak_mem_bytes'] / 2**30:>10.2f} GiB (measured: "
                 "CUDA max allocated, or the process's peak RSS on a CPU)")  # fmt: skip
    if "estimated_peak_bytes" in med:
        lines.append(f"{'estimated peak':<16} {med['estimated_peak_bytes'] / 2**30:>10.2f} GiB "
                     "(train/memory.py, checked before the first rollout)")  # fmt: skip
    return "\n".join(lines)


def add_bench_train(targets: Any) -> None:
    """Register ``bench train`` on the ``bench`` sub-command parser."""
    p = targets.add_parser(
        "train",
        help="time GRPO steps: stages, model calls and the trainer's own overhead",
        description=(
            "Run GRPO steps of a training config (eval and checkpoints off) with every "
            "transformer forward, backward, decode and reward call timed; print the split of a "
            "step and the overhead outside those calls; write bench_out/train_*.csv and .json."
        ),
        epilog="Overrides as for `smartgrpo-fast train`, e.g. noise=random search.k=4.",
    )
    p.add_argument("--config", default="tiny", help="a shipped config or YAML (default: tiny)")
    p.add_argument("--steps", type=int, default=3, help="measured steps (default: 3)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured first steps (default: 1)")
    p.add_argument("--out", type=Path, default=Path("bench_out"),
                   help="output folder (default: bench_out)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.set_defaults(handler=_run_bench_train, parser=p)


def _run_bench_train(args: Any) -> int:
    from smartgrpo_fast.train.config import ConfigError, load_config

    parser = args.parser
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"argument --steps/--warmup: expected >= 1 and >= 0, got {args.steps}, "
                     f"{args.warmup}")  # fmt: skip
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        parser.error(str(err))
    try:
        rows = run_train_bench(config, steps=args.steps, warmup=args.warmup,
                               progress=not args.no_progress)  # fmt: skip
    except ConfigError as err:
        parser.error(str(err))
    first = rows[0]
    stem = args.out / f"train_{config.noise}_{first['device'].replace(':', '')}"
    csv_path, json_path = write_csv(rows, stem.with_suffix(".csv")), write_json(
        rows, stem.with_suffix(".json"))  # fmt: skip
    print(
        f"bench train: config {args.config} {' '.join(args.overrides)} noise={config.noise} "
        f"on {first['device_name']}, torch {first['torch_version']}, commit "
        f"{first['git_commit']}, median of {args.steps} steps after {args.warmup} warm-up"
    )
    print(format_train_table(rows))
    print(f"\nCSV:  {csv_path}\nJSON: {json_path}")
    return 0
