"""The trainer's configuration: frozen dataclasses, YAML files and dotted overrides.

A run is described by one :class:`RunConfig`. ``load_config("tiny", ["seed=3",
"search.k=4"])`` reads the YAML file shipped as ``smartgrpo_fast/train/configs/tiny.yaml`` (or
any YAML path), applies ``KEY=VALUE`` overrides (values parsed as YAML scalars: ``3``,
``0.5``, ``null``, ``true``, ``[0, 5]``) and validates everything before any work. An unknown
key or a bad value raises :class:`ConfigError` naming the dotted key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from smartgrpo_fast.models.lora import LoraSpec
from smartgrpo_fast.models.sd3 import SEARCH_DTYPES
from smartgrpo_fast.sde import SDE_TYPES
from smartgrpo_fast.search.config import SearchConfig

__all__ = [
    "NOISE_STRATEGIES",
    "ConfigError",
    "DataConfig",
    "EvalSection",
    "LogConfig",
    "ModelConfig",
    "RunConfig",
    "SampleConfig",
    "TrainConfig",
    "config_to_dict",
    "load_config",
    "shipped_configs",
]

CONFIG_DIR = Path(__file__).parent / "configs"
NOISE_STRATEGIES = ("smart", "random", "bestof")


class ConfigError(ValueError):
    """A configuration key is unknown or its value is invalid; the message starts with the key."""


def _positive_int(name: str, v: object, minimum: int = 1) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {v!r}")


def _finite(name: str, v: object, lo: float = -math.inf, lo_open: bool = False) -> None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or v < lo or (lo_open and v == lo):
        raise ValueError(f"{name}: expected a finite number {'>' if lo_open else '>='} {lo}, "
                         f"got {v!r}")  # fmt: skip


@dataclass(frozen=True)
class ModelConfig:
    """Which flow model is trained.

    Attributes:
        name: ``tiny`` (the embedded model) or a StableDiffusion3Pipeline folder / HF-cache id.
        dtype: ``float32``, ``bfloat16`` or ``float16`` for the transformer (the SD3 VAE stays
            float32; the trajectory latents and log-probabilities are always float32).
        resolution: SD3 image side in pixels (Flow-GRPO trains at 512); None = the model's.
        guidance_scale: classifier-free guidance; None = as the model is configured (tiny:
            its config.json; SD3: off).
        graph: the transformer forward's backend for rollouts and searches (``eager``,
            ``graph``, ``compile-reduce-overhead``); training forwards always run eager.
        gradient_checkpointing: recompute transformer activations in the backward pass.
        release_text_encoders: SD3: encode each prompt once into ``embedding_cache`` and free
            the text encoders' memory afterwards.
        embedding_cache: folder of cached prompt embeddings (SD3), None for none.
        max_sequence_length: T5 tokens per prompt (SD3; Flow-GRPO uses 128).
        preview_decoder: SD3: the decoder of the search's one-step estimates (the rollouts'
            final images still go through the VAE): a local diffusers ``AutoencoderTiny``
            folder such as TAESD3, or ``random``: TAESD3's layout with random weights at the
            model's size, for timing only (the full-size one when the VAE up-samples 8x, as
            ``random:sd35-medium`` and real SD3 folders; the tiny one for ``random:sd3-tiny``
            and the tiny random pipeline). Run in the transformer's dtype. None: the search
            decodes with the VAE. The embedded model ``tiny`` decodes nothing (pixel space).
        search_dtype: SD3: ``model`` (default: the search's forwards are the rollout's) or
            ``float8``: the search scores its candidates on a float8 copy of the transformer
            (torchao, extra ``fp8``; CUDA, compute capability >= 8.9;
            :func:`smartgrpo_fast.models.fp8.float8_transformer`) whose LoRA adapter is the
            trained one's own tensors, so it follows every update. Only the ranking of
            candidates sees float8: the rollout's steps, log-probabilities and the update run
            on the model, and the step after a searched one makes its own forward
            (``sample.reuse_search_velocity`` applies only to ``model``). Needs ``lora``.
    """

    name: str = "tiny"
    dtype: str = "float32"
    resolution: int | None = None
    guidance_scale: float | None = None
    graph: str = "eager"
    gradient_checkpointing: bool = False
    release_text_encoders: bool = False
    embedding_cache: str | None = None
    max_sequence_length: int = 128
    preview_decoder: str | None = None
    search_dtype: str = "model"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name: expected a model name or path, got {self.name!r}")
        if self.search_dtype not in SEARCH_DTYPES:
            raise ValueError(f"search_dtype: expected one of {', '.join(SEARCH_DTYPES)}, "
                             f"got {self.search_dtype!r}")  # fmt: skip
        if self.search_dtype != "model" and self.name == "tiny":
            raise ValueError(f"search_dtype: {self.search_dtype} forwards are for SD3 models; "
                             "the embedded model tiny has search_dtype model")  # fmt: skip
        if self.preview_decoder is not None:
            if not isinstance(self.preview_decoder, str) or not self.preview_decoder:
                raise ValueError(f"preview_decoder: expected an AutoencoderTiny folder, random "
                                 f"or null, got {self.preview_decoder!r}")  # fmt: skip
            if self.name == "tiny":
                raise ValueError(
                    f"preview_decoder: the embedded model tiny works in pixel space and decodes "
                    f"nothing; expected null, got {self.preview_decoder!r}"
                )
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype: expected float32, bfloat16 or float16, got {self.dtype!r}")
        if self.resolution is not None:
            _positive_int("resolution", self.resolution)
        if self.guidance_scale is not None:
            _finite("guidance_scale", self.guidance_scale, 1.0)
        if self.graph not in ("eager", "graph", "compile-reduce-overhead", "compile-max-autotune"):
            raise ValueError(f"graph: expected eager, graph or a compile mode, got {self.graph!r}")
        _positive_int("max_sequence_length", self.max_sequence_length)


@dataclass(frozen=True)
class SampleConfig:
    """The rollouts of one optimizer step.

    Attributes:
        prompts_per_step: prompts per optimizer step, over all processes (a multiple of the
            number of processes: each process takes a contiguous shard, groups stay whole).
        group_size: rollouts per prompt (G); advantages are taken within each group.
        steps: sampling steps from t = 1 to 0 on the model's own schedule (``time_shift``).
        sde_window_size: SDE steps per rollout (the others are ODE steps; Flow-GRPO-Fast).
        sde_window_range: ``[lo, hi)``: the window's start is drawn per optimizer step from
            ``lo .. hi - sde_window_size`` (keyed by the seed and the step).
        noise_level: the SDE's noise level (Flow-GRPO: 0.7 for ``sde``, 0.8 for ``cps``).
        sde_type: ``sde`` or ``cps`` (:func:`smartgrpo_fast.sde.sde_step`).
        shift: the schedule's time shift; None = the model's (``sde.schedule_shift``).
        batch: rollouts generated together (rows per rollout forward); the results do not
            depend on it (every draw is keyed by global indices).
        shared_initial_noise: the G rollouts of a prompt start from one x_T (DanceGRPO's
            choice) instead of one each (Flow-GRPO's, the default): a group's spread then comes
            from the SDE steps alone, the only steps whose log-probability the update credits.
        search_steps: ``noise: smart`` / ``bestof``: how many of the window's SDE steps take
            searched noise (the first or the last ones, ``search_steps_at``); the others take
            the ``random`` draw of their step. None (default): every SDE step is searched. The
            search's cost scales with it (K*N forward rows per searched step and rollout).
        search_steps_at: ``end`` (default) or ``start``: which of the window's SDE steps
            ``search_steps`` searches. Chosen on dev prompts of the embedded model
            (``benchmarks/search_steps.py``, RESULTS.md): searching the last of 2 kept more of
            the search's gain in final reward than searching the first (prompt match +0.16 vs
            +0.07 over random noise; shape-area +0.0021 vs +0.0018), neither as much as
            searching both (+0.29; +0.0051).
        reuse_search_velocity: after a searched step, take the search's velocity at the
            chosen candidate (``search.use: best``, or ``bestof``) as the next step's instead
            of a forward of its own: one forward row fewer per searched step and rollout. The
            search computed it in its batch of ``batch * search.k`` rows, so it equals the
            rollout's own forward up to float order (``train/rollout.py``).
    """

    prompts_per_step: int = 4
    group_size: int = 8
    steps: int = 10
    sde_window_size: int = 2
    sde_window_range: tuple[int, int] = (0, 5)
    noise_level: float = 0.7
    sde_type: str = "sde"
    shift: float | None = None
    batch: int = 64
    shared_initial_noise: bool = False
    search_steps: int | None = None
    search_steps_at: str = "end"
    reuse_search_velocity: bool = True

    def __post_init__(self) -> None:
        _positive_int("prompts_per_step", self.prompts_per_step)
        _positive_int("group_size", self.group_size, 2)
        _positive_int("steps", self.steps)
        _positive_int("sde_window_size", self.sde_window_size)
        _positive_int("batch", self.batch)
        lo_hi = tuple(self.sde_window_range)
        if (
            len(lo_hi) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in lo_hi)
            or lo_hi[0] < 0
            or lo_hi[1] > self.steps
            or lo_hi[1] - lo_hi[0] < self.sde_window_size
        ):
            raise ValueError(
                f"sde_window_range: expected [lo, hi) with 0 <= lo, hi <= steps = {self.steps} "
                f"and hi - lo >= sde_window_size = {self.sde_window_size}, "
                f"got {self.sde_window_range!r}"
            )
        _finite("noise_level", self.noise_level, 0.0, lo_open=True)
        if self.sde_type == "cps" and lo_hi[1] > self.steps - 1:
            raise ValueError(
                f"sde_window_range: with sde_type cps the last step (to t = 0, where cps has no "
                f"noise) must stay an ODE step: expected hi <= steps - 1 = {self.steps - 1}, "
                f"got {self.sde_window_range!r}"
            )
        if self.sde_type not in SDE_TYPES:
            raise ValueError(f"sde_type: expected one of {', '.join(SDE_TYPES)}, "
                             f"got {self.sde_type!r}")  # fmt: skip
        if self.shift is not None:
            _finite("shift", self.shift, 0.0, lo_open=True)
        if self.search_steps is not None and (
            isinstance(self.search_steps, bool)
            or not isinstance(self.search_steps, int)
            or not 1 <= self.search_steps <= self.sde_window_size
        ):
            raise ValueError(
                f"search_steps: expected null or 1 <= search_steps <= sde_window_size = "
                f"{self.sde_window_size}, got {self.search_steps!r}"
            )
        if self.search_steps_at not in ("start", "end"):
            raise ValueError(
                f"search_steps_at: expected start or end, got {self.search_steps_at!r}"
            )


@dataclass(frozen=True)
class TrainConfig:
    """The GRPO update (Flow-GRPO's defaults unless noted).

    Attributes:
        steps: optimizer steps of the run.
        lr: AdamW learning rate (Flow-GRPO: 3e-4 with LoRA).
        weight_decay: AdamW weight decay (1e-4).
        betas: AdamW betas.
        warmup_steps: linear learning-rate warm-up steps, then constant.
        clip_range: PPO ratio clip (Flow-GRPO: 1e-4; Fast: 1e-5).
        adv_clip: advantages are clipped to +-adv_clip (5).
        global_std: normalise advantages by the std of the whole step's rewards instead of
            each group's.
        kl_beta: weight of the KL to the base model (adapter disabled); 0 = no reference pass.
            Scaled as Flow-GRPO's (its beta values, 0.01-0.04, mean the same here).
        max_grad_norm: gradient clipping (1.0); 0 = off.
        micro_batch: rollouts per training forward (gradient accumulation over micro-batches
            and SDE steps); the gradient does not depend on it.
        ema_decay: EMA of the trained weights (Flow-GRPO: 0.9), None = off; after optimizer
            step s the decay is ``min((1 + s) / (10 + s), ema_decay)`` (Flow-GRPO's warm-up).
        ema_every: optimizer steps between EMA updates (Flow-GRPO: 8).
        save_every: optimizer steps between checkpoints (one is always written at the end).
        keep_last: complete checkpoints kept (older ones are deleted).
        async_reward: score a rollout batch's images in the background while the next batch
            is sampled (``rewards.AsyncReward``).
        memory_limit_gib: device memory a step may use (:mod:`~.memory`'s estimate, checked
            after the models are built and before the first rollout; an estimate above it is
            an error naming the setting to lower). None: the CUDA device's total memory (no
            check on a CPU). E.g. 80 checks on a larger GPU that a step fits an 80 GB one.
    """

    steps: int = 100
    lr: float = 3e-4
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    clip_range: float = 1e-4
    adv_clip: float = 5.0
    global_std: bool = False
    kl_beta: float = 0.0
    max_grad_norm: float = 1.0
    micro_batch: int = 16
    ema_decay: float | None = None
    ema_every: int = 8
    save_every: int = 50
    keep_last: int = 2
    async_reward: bool = True
    memory_limit_gib: float | None = None

    def __post_init__(self) -> None:
        _positive_int("steps", self.steps)
        _finite("lr", self.lr, 0.0, lo_open=True)
        _finite("weight_decay", self.weight_decay, 0.0)
        if len(tuple(self.betas)) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas: expected two values in [0, 1), got {self.betas!r}")
        _positive_int("warmup_steps", self.warmup_steps, 0)
        _finite("clip_range", self.clip_range, 0.0, lo_open=True)
        _finite("adv_clip", self.adv_clip, 0.0, lo_open=True)
        _finite("kl_beta", self.kl_beta, 0.0)
        _finite("max_grad_norm", self.max_grad_norm, 0.0)
        _positive_int("micro_batch", self.micro_batch)
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay: expected None or a value in (0, 1), got {self.ema_decay}")
        _positive_int("ema_every", self.ema_every)
        _positive_int("save_every", self.save_every)
        _positive_int("keep_last", self.keep_last)
        if self.memory_limit_gib is not None:
            _finite("memory_limit_gib", self.memory_limit_gib, 0.0, lo_open=True)


@dataclass(frozen=True)
class DataConfig:
    """Training and evaluation prompts.

    Attributes:
        prompts: ``tiny`` (the embedded world's sampler, fresh prompts each step), a text file
            (one prompt per line) or a JSONL file with a ``prompt`` field per line.
        eval_prompts: the held-out prompts: ``tiny`` (``eval.num_prompts`` prompts from a seed
            the training sampler never uses) or a file as above.
    """

    prompts: str = "tiny"
    eval_prompts: str = "tiny"

    def __post_init__(self) -> None:
        for name in ("prompts", "eval_prompts"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name}: expected 'tiny' or a file path, got "
                                 f"{getattr(self, name)!r}")  # fmt: skip


@dataclass(frozen=True)
class EvalSection:
    """Evaluation during training (the ODE from fixed noise on the held-out prompts).

    Attributes:
        every: optimizer steps between evaluations (step 0 is always evaluated, as the
            baseline); 0 = never.
        num_prompts: held-out prompts (``data.eval_prompts: tiny``; files: at most this many).
        steps: ODE steps.
        seed: keys the evaluation's initial noise (the same at every evaluation).
        batch: images sampled together.
        images_per_prompt: images of each prompt (from as many noises); ``eval_reward_mean``
            is the mean over prompts of their images' mean reward.
    """

    every: int = 25
    num_prompts: int = 32
    steps: int = 20
    seed: int = 1234
    batch: int = 32
    images_per_prompt: int = 1

    def __post_init__(self) -> None:
        _positive_int("every", self.every, 0)
        _positive_int("num_prompts", self.num_prompts)
        _positive_int("steps", self.steps)
        _positive_int("seed", self.seed, 0)
        _positive_int("batch", self.batch)
        _positive_int("images_per_prompt", self.images_per_prompt)


@dataclass(frozen=True)
class LogConfig:
    """Where the run reports.

    Attributes:
        tensorboard: also write TensorBoard event files to ``RUN/tensorboard`` (on by
            default: ``tensorboard --logdir RUN``).
        progress: show a progress bar over the optimizer steps.
    """

    tensorboard: bool = True
    progress: bool = True


@dataclass(frozen=True)
class RunConfig:
    """One training run (see ``configs/tiny.yaml`` for a commented example).

    Attributes:
        seed: keys every random draw of the run (initial noise, SDE noise, search, window,
            prompts, LoRA initialisation) together with the step and global indices.
        noise: ``smart`` (NoiseSearch per rollout), ``random`` (plain Flow-GRPO: N(0, I)) or
            ``bestof`` (best of M = K*N one-step-scored draws, equal model calls to ``smart``).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        reward: a reward spec (``tiny``, ``imagereward:1,aesthetic:0.1``, ...).
        reward_args: keyword arguments of the reward loaders (checkpoint paths, ``dtype``).
        search_reward_args: keyword arguments set over ``reward_args`` for a second copy of
            the reward that only the search scores its candidates with, e.g. ``{dtype:
            bfloat16}``: K*N candidates per searched step are ranked in bfloat16 while the
            rollouts' rewards (the advantages) stay in ``reward_args``' dtype. Empty (default):
            the search scores with the run's reward. Not used by ``noise: random``.
        lora: the adapter trained (None = full fine-tuning of the transformer).

    ``search.seed`` is not used by the trainer: each search is keyed by (seed, step, SDE step)
    and its rows by the global rollout index.
    """

    seed: int = 0
    noise: str = "smart"
    device: str = "auto"
    model: ModelConfig = field(default_factory=ModelConfig)
    reward: str = "tiny"
    reward_args: dict[str, Any] = field(default_factory=dict)
    search_reward_args: dict[str, Any] = field(default_factory=dict)
    sample: SampleConfig = field(default_factory=SampleConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraSpec | None = field(default_factory=LoraSpec)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalSection = field(default_factory=EvalSection)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        _positive_int("seed", self.seed, 0)
        if self.seed >= 2**62:
            raise ValueError(f"seed: expected < 2**62, got {self.seed}")
        if self.noise not in NOISE_STRATEGIES:
            raise ValueError(f"noise: expected one of {', '.join(NOISE_STRATEGIES)}, "
                             f"got {self.noise!r}")  # fmt: skip
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device: expected auto, cpu, cuda or cuda:N, got {self.device!r}")
        if not isinstance(self.reward, str) or not self.reward:
            raise ValueError(f"reward: expected a reward spec, got {self.reward!r}")
        if self.model.search_dtype != "model" and self.lora is None:
            raise ValueError(
                f"model.search_dtype: {self.model.search_dtype} search forwards run on a copy "
                "that shares only a LoRA adapter with the model; full fine-tuning (lora: null) "
                "needs search_dtype model"
            )
        from smartgrpo_fast.rewards import check_names

        try:
            check_names(self.reward)
        except ValueError as err:
            raise ValueError(f"reward: {err}") from None
        from smartgrpo_fast.rewards import reward_dtype

        for name in ("reward_args", "search_reward_args"):
            args = getattr(self, name)
            if not isinstance(args, dict):
                raise ValueError(f"{name}: expected a mapping, got {args!r}")
            if "dtype" in args:
                try:
                    reward_dtype(args["dtype"])
                except ValueError as err:
                    raise ValueError(f"{name}: {err}") from None


# --------------------------------------------------------------------------- dict <-> config


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass in ``tp`` (``X`` or ``X | None``), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def _allows_none(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in (
        typing.get_args(tp)
    )


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """``value`` (from YAML) as the field type ``tp``; ConfigError naming ``key`` if it can't."""
    if value is None:
        if _allows_none(tp):
            return None
        raise ConfigError(f"{key}: expected a value, got null")
    base = tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        base = next(a for a in typing.get_args(tp) if a is not type(None))
    origin = typing.get_origin(base)
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if base is float:
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if base is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(base)
        item = args[0] if len(args) == 2 and args[1] is Ellipsis else None
        if item is None and len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} items, got {list(value)!r}")
        return tuple(_coerce(f"{key}[{i}]", item or args[i], v) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(f"{key}: unknown key (known under {prefix or 'the top level'}: "
                          f"{', '.join(sorted(names))})")  # fmt: skip
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key, tp = f"{prefix}{name}", hints[name]
        sub = _dataclass_in(tp)
        if sub is not None and value is not None and not dataclasses.is_dataclass(value):
            kwargs[name] = _build(sub, value, f"{key}.")
        elif sub is not None and value is None and not _allows_none(tp):
            raise ConfigError(f"{key}: expected a mapping, got null")
        else:
            kwargs[name] = value if dataclasses.is_dataclass(value) else _coerce(key, tp, value)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{prefix}{exc}") from exc


def config_to_dict(cfg: Any) -> Any:
    """A dataclass config as plain YAML-ready data (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (tuple, list)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    return cfg


def shipped_configs() -> list[str]:
    """Names of the YAML configs that ship in the package (``--config NAME``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _read_yaml(name_or_file: str | Path) -> dict[str, Any]:
    path = Path(name_or_file)
    if not path.suffix and (CONFIG_DIR / f"{name_or_file}.yaml").is_file():
        path = CONFIG_DIR / f"{name_or_file}.yaml"
    if not path.is_file():
        raise ConfigError(f"config: {name_or_file!r} is neither a shipped config "
                          f"({', '.join(shipped_configs())}) nor a YAML file")  # fmt: skip
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config: {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a mapping at the top level")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``data`` with each ``a.b.c=VALUE`` set (VALUE parsed as a YAML scalar or list)."""
    out = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{item}: expected KEY=VALUE (a dotted key, e.g. search.k=4)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"{key}: cannot parse {raw!r}: {exc}") from exc
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{key}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """A validated :class:`RunConfig` from nested mappings (ConfigError naming the key)."""
    return _build(RunConfig, data, "")


def load_config(name_or_file: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a shipped config by name (``tiny``, ``sd35-medium``) or a YAML file, apply the
    ``KEY=VALUE`` overrides and validate (ConfigError naming the first bad key)."""
    return config_from_dict(apply_overrides(_read_yaml(name_or_file), list(overrides or [])))
