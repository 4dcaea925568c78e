"""The thin GRPO trainer: rollouts with searched noise, the clipped policy loss, the loop.

One optimizer step (:meth:`GRPOTrainer.train_step`):

1. the step's prompts (``sample.prompts_per_step``, sharded contiguously over processes, each
   group on one process) and its SDE window;
2. ``group_size`` rollouts per prompt (:func:`~.rollout.sample_rollouts`) with ``noise``
   ``smart`` / ``random`` / ``bestof`` at the SDE steps, final rewards (optionally scored in the
   background while the next batch samples);
3. rewards all-gathered, per-prompt advantages (:func:`~.loss.group_advantages`);
4. rows whose advantage is 0 dropped (Flow-GRPO); for every micro-batch of the kept rollouts
   and every SDE step: a training forward at the stored latent, the policy's log-probability
   of the stored next latent, Flow-GRPO's clipped loss plus ``kl_beta`` times the KL to the
   adapter-disabled model (Flow-GRPO's scale), backward (accumulated; the gradient is the
   mean over the kept rollouts of all processes and the SDE steps, whatever ``micro_batch``
   is); DDP averages it over processes;
5. gradient clipping, AdamW, optional EMA (Flow-GRPO's warm-up); metrics, checkpoints,
   evaluation.

``RUN/`` layout (a contract): ``config.yaml``, ``metrics.jsonl`` (one object per optimizer
step), ``eval.jsonl``, ``samples/step-NNNNNN.png``, ``checkpoints/step-NNNNNN/`` (see
:mod:`.checkpoint`), ``tensorboard/``.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import json
import logging
import math
import os
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from smartgrpo_fast.models.lora import (
    adapter_disabled,
    attach_lora,
    load_adapter,
    save_adapter,
    save_diffusers_lora,
)
from smartgrpo_fast.models.sd3_configs import PREVIEW_RANDOM, preview_decoder_for
from smartgrpo_fast.sde import flow_sigmas, schedule_shift, sde_log_prob, sde_step
from smartgrpo_fast.search import NoiseSearch
from smartgrpo_fast.train.checkpoint import (
    latest_checkpoint,
    newest_readable_checkpoint,
    save_checkpoint,
)
from smartgrpo_fast.train.config import ConfigError, RunConfig, config_to_dict
from smartgrpo_fast.train.data import PromptSource, derive_seed, eval_prompts
from smartgrpo_fast.train.evaluate import EvalConfig, evaluate, reward_labels, save_grid
from smartgrpo_fast.train.loss import Advantages, group_advantages, policy_terms
from smartgrpo_fast.train.rollout import Rollouts, sample_rollouts, sde_window

__all__ = [
    "METRIC_KEYS",
    "GRPOTrainer",
    "build_model",
    "build_preview_decoder",
    "build_reward",
    "read_prompts",
    "resolve_device",
]

log = logging.getLogger(__name__)

#: The keys every line of ``metrics.jsonl`` has (outside checks read them).
METRIC_KEYS = (
    "step", "reward_mean", "reward_std", "loss", "policy_loss", "kl", "clip_frac", "approx_kl",
    "logp_diff_max", "grad_norm", "lr", "zero_std_frac", "nonfinite_rewards", "search_gain",
    "time_search", "time_rollout", "time_reward", "time_update", "time_step", "peak_mem_bytes",
    "world_size", "rows_kept",
)  # fmt: skip
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: What a checkpoint must agree on with the run that resumes it.
_IDENTITY = ("model.name", "reward", "lora")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The torch device of the config's ``device`` (``auto``: CUDA when available) for a
    process with ``local_rank``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", local_rank)
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {name} requested but torch has no CUDA here")
    return torch.device(name)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def read_prompts(cfg: RunConfig) -> tuple[PromptSource, list[str]]:
    """The run's training prompts (``data.prompts``) and held-out prompts
    (``data.eval_prompts``), read and checked against what the model and the reward can read
    (the embedded world's grammar for ``tiny``) before any model is built.

    Raises:
        ConfigError: ``data.prompts: ...`` / ``data.eval_prompts: ...``: a missing or empty
            file, a JSONL line without a ``prompt`` string, a prompt outside the grammar.
    """
    from smartgrpo_fast import models, rewards

    def check(key: str, path: str, prompts: list[str]) -> None:
        try:
            models.check_prompts(cfg.model.name, prompts)
            rewards.check_prompts(cfg.reward, prompts)
        except ValueError as err:
            raise ConfigError(f"{key}: {path}: {_one_line(err)}") from None

    try:
        source = PromptSource(cfg.data.prompts, cfg.seed)
    except (OSError, ValueError) as err:
        raise ConfigError(f"data.prompts: {_one_line(err)}") from None
    if source.prompts is not None:
        check("data.prompts", cfg.data.prompts, source.prompts)
    try:
        held_out = eval_prompts(cfg.data.eval_prompts, cfg.eval.num_prompts)
    except (OSError, ValueError) as err:
        raise ConfigError(f"data.eval_prompts: {_one_line(err)}") from None
    if cfg.data.eval_prompts != "tiny":
        check("data.eval_prompts", cfg.data.eval_prompts, held_out)
    return source, held_out


def build_model(cfg: RunConfig, device: torch.device) -> Any:
    """The run's flow model (``model.*``), on ``device``, with its preview decoder
    (``model.preview_decoder``) attached; a folder that does not load is a
    :class:`ConfigError` naming ``model.name`` (``model.preview_decoder`` for the decoder's,
    checked before the model is built)."""
    if cfg.model.preview_decoder not in (None, PREVIEW_RANDOM):
        with _preview_errors():
            from smartgrpo_fast.models.sd3 import _check_preview_layout

            path = Path(cfg.model.preview_decoder).expanduser()
            _check_preview_layout(path, _latent_channels(cfg.model.name))
    try:
        model = _build_model(cfg, device)
    except (OSError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"model.name: {_one_line(err)}") from err
    if cfg.model.preview_decoder is not None:
        with _preview_errors():
            model.set_preview_decoder(build_preview_decoder(cfg.model.preview_decoder, model))
    return model


@contextlib.contextmanager
def _preview_errors() -> Iterator[None]:
    """Re-raise a preview decoder's loading error as a ConfigError naming the key."""
    try:
        yield
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.preview_decoder: {_one_line(err)}") from err


def _latent_channels(name: str) -> int:
    """Latent channels of the SD3 model ``name`` read without building it (its
    ``transformer/config.json``, or the random model's config; 16, SD3's, when unreadable:
    the decoder is checked again against the built model)."""
    from smartgrpo_fast.models.sd3_configs import RANDOM_MODELS

    if name.startswith("random:"):
        configs = RANDOM_MODELS.get(name.removeprefix("random:"))
        return int(configs[0]["in_channels"]) if configs else 16
    try:
        meta = json.loads((Path(name).expanduser() / "transformer" / "config.json").read_text())
        return int(meta.get("in_channels", 16))
    except (OSError, ValueError, TypeError, AttributeError):
        return 16


def build_preview_decoder(spec: str, model: Any) -> Any:
    """The decoder of ``model.preview_decoder = spec`` for ``model``
    (:func:`smartgrpo_fast.models.sd3_configs.preview_decoder_for`: a local AutoencoderTiny
    folder, or ``random``: TAESD3's layout with random weights at the model's size)."""
    return preview_decoder_for(spec, model)


def _build_model(cfg: RunConfig, device: torch.device) -> Any:
    from smartgrpo_fast import models
    from smartgrpo_fast.graphs import GraphConfig

    m = cfg.model
    dtype = _DTYPES[m.dtype]
    graph = GraphConfig(backend=m.graph)
    if m.name == "tiny":
        kw: dict[str, Any] = {"device": device, "dtype": dtype, "graph": graph}
        if m.guidance_scale is not None:
            kw["guidance_scale"] = m.guidance_scale
        model = models.load("tiny", **kw)
    else:
        from smartgrpo_fast.models.sd3 import SD3Config

        sd3 = SD3Config(
            max_sequence_length=m.max_sequence_length,
            guidance_scale=1.0 if m.guidance_scale is None else m.guidance_scale,
            graph=graph,
            release_text_encoders=m.release_text_encoders,
            embedding_cache=m.embedding_cache,
            resolution=m.resolution,
        )
        model = models.load(m.name, dtype=dtype, device=device, config=sd3)
    if m.gradient_checkpointing:
        model.transformer.enable_gradient_checkpointing()
    return model


def build_reward(cfg: RunConfig, device: torch.device, *, search: bool = False) -> Any:
    """The run's reward (``reward``, ``reward_args``) on ``device``; ``search=True``: the
    search's copy, with ``search_reward_args`` set over ``reward_args``. A checkpoint that is
    missing or does not load, or an argument its loader does not take, is a
    :class:`ConfigError` naming ``reward`` or the arguments' key."""
    from smartgrpo_fast.rewards import reward_from_spec

    key = "search_reward_args" if search else "reward_args"
    args = {**cfg.reward_args, **cfg.search_reward_args} if search else cfg.reward_args
    try:
        return reward_from_spec(cfg.reward, device=device, **args)
    except TypeError as err:
        raise ConfigError(f"{key}: {cfg.reward}: {_one_line(err)}") from err
    except (OSError, ValueError) as err:  # a bad dtype is refused when the config loads
        raise ConfigError(f"reward: {cfg.reward}: {_one_line(err)}") from err


class _Dist:
    """This process's place in a torch.distributed job (torchrun / accelerate launch env)."""

    def __init__(self, device_name: str) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = resolve_device(device_name, self.local_rank)
        self.owns_group = False
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend)
            self.owns_group = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenation over ranks (rank order) of equal-shaped tensors."""
        if self.world == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return t

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _check_search_dtype(search_dtype: str, device: torch.device) -> None:
    """A ConfigError naming ``model.search_dtype`` where its forwards cannot run here."""
    from smartgrpo_fast.models.fp8 import check_float8

    try:
        check_float8(device)
    except RuntimeError as err:
        raise ConfigError(f"model.search_dtype: {_one_line(err)}") from None


def _search_model(model: Any, search_dtype: str) -> Any:
    """The model the search scores candidates with (``model.search_dtype``)."""
    if search_dtype == "model":
        return model
    for_search = getattr(model, "for_search", None)
    if not callable(for_search):
        raise ConfigError(f"model.search_dtype: {search_dtype} forwards are for SD3 models; "
                          f"{type(model).__name__} has none")  # fmt: skip
    return for_search(search_dtype)


def _tensor_bytes(t: torch.Tensor, seen: set[int]) -> int:
    """Bytes of ``t``'s storage not in ``seen`` (a tensor subclass such as torchao's
    Float8Tensor: its inner tensors')."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None:
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n), seen) for n in names)
    if t.data_ptr() in seen:
        return 0
    seen.add(t.data_ptr())
    return t.numel() * t.element_size()


def _module_bytes(*objects: Any) -> int:
    """Bytes of the distinct tensors (parameters and buffers) of the modules that ``objects``
    are or hold as attributes (a flow model's transformer, VAE and text encoders, a reward)."""
    seen: set[int] = set()
    total = 0
    for obj in objects:
        mods = [obj] if isinstance(obj, torch.nn.Module) else []
        holders = [obj, getattr(obj, "pipe", None), getattr(obj, "reward", None)]
        for h in holders:
            if h is not None and not isinstance(h, torch.nn.Module):
                mods += [v for v in vars(h).values() if isinstance(v, torch.nn.Module)]
        for m in mods:
            for t in [*m.parameters(), *m.buffers()]:
                total += _tensor_bytes(t, seen)
    return total


def _row_list(rows: slice | list[int]) -> list[int]:
    return list(range(rows.start, rows.stop)) if isinstance(rows, slice) else list(rows)


def _take(t: torch.Tensor, rows: slice | list[int], idx: list[int], j: int) -> torch.Tensor:
    """``t[rows, j]``: a view for a slice, a gather for row indices."""
    if isinstance(rows, slice):
        return t[rows, j]
    return t[torch.as_tensor(idx, device=t.device), j]


def ema_decay_at(step: int, decay: float) -> float:
    """Flow-GRPO's EMA decay after ``step`` optimizer steps: ``min((1 + step) / (10 + step),
    decay)`` (a warm-up: 0.18 after the first step, 0.5 after 8, ``decay`` from then on for
    0.9)."""
    return min((1.0 + step) / (10.0 + step), decay)


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(rss if sys.platform == "darwin" else rss * 1024)


class GRPOTrainer:
    """Train ``config``'s model with GRPO into the run folder ``out``.

    Args:
        config: the run (:class:`~.config.RunConfig`).
        out: the run folder (created; rank 0 writes it).
        resume: continue from ``out``'s newest complete checkpoint (incomplete ones ignored;
            ``metrics.jsonl`` lines after it dropped). A checkpoint of another model, reward or
            LoRA shape is refused with an error naming the field.
        model, reward: prebuilt objects (tests); default: built from the config.
    """

    def __init__(
        self,
        config: RunConfig,
        out: str | Path,
        *,
        resume: bool = False,
        model: Any | None = None,
        reward: Any | None = None,
    ) -> None:
        self.cfg = cfg = config
        self.out = Path(out)
        self.dist = _Dist(cfg.device)
        self.device = self.dist.device
        if cfg.sample.prompts_per_step % self.dist.world:
            raise ConfigError(
                f"sample.prompts_per_step: {cfg.sample.prompts_per_step} prompts cannot be "
                f"shared by {self.dist.world} processes (each group stays on one process)"
            )
        if cfg.lora is None and cfg.train.kl_beta > 0:
            raise ConfigError("train.kl_beta: the KL reference is the adapter-disabled model; "
                              "full fine-tuning (lora: null) needs kl_beta 0")  # fmt: skip
        self.prompts, self.eval_prompts = read_prompts(cfg)
        if cfg.model.search_dtype != "model" and cfg.noise != "random":
            _check_search_dtype(cfg.model.search_dtype, self.device)  # before any model loads
        torch.manual_seed(derive_seed(cfg.seed, "init"))
        self.model = model if model is not None else build_model(cfg, self.device)
        self.reward = reward if reward is not None else build_reward(cfg, self.device)
        if cfg.lora is not None:
            self.params = attach_lora(self.model, cfg.lora)
        else:
            self.model.transformer.requires_grad_(True)
            self.params = [p for p in self.model.transformer.parameters() if p.requires_grad]
        self.names = [n for n, p in self.model.transformer.named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.train.lr, betas=tuple(cfg.train.betas),
            weight_decay=cfg.train.weight_decay,
        )  # fmt: skip
        self.ema = (
            [p.detach().clone() for p in self.params] if cfg.train.ema_decay is not None else None
        )
        self.ddp = None
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            # No buffer sync in forward (every rank loads the same buffers); torch 2.13 renamed
            # the argument and warns on the old one, torch 2.11 (the GPU machines') has only it.
            new = "forward_sync_buffers"
            known = inspect.signature(DistributedDataParallel).parameters
            sync = new if new in known else "broadcast_buffers"
            self.ddp = DistributedDataParallel(self.model.transformer, device_ids=ids,
                                               **{sync: False})  # fmt: skip
        self.searcher = None
        self.search_model = self.model
        #: The reward the search ranks candidates with (``search_reward_args``' copy, or
        #: ``self.reward`` when none is configured).
        self.search_reward = self.reward
        if cfg.noise != "random":
            strategy = "cem" if cfg.noise == "smart" else "best_of"
            if cfg.search_reward_args:
                self.search_reward = build_reward(cfg, self.device, search=True)
            #: The model the search's forwards run on: ``self.model``, or its float8 copy
            #: sharing the adapter (``model.search_dtype``).
            self.search_model = _search_model(self.model, cfg.model.search_dtype)
            self.searcher = NoiseSearch(self.search_model, self.search_reward,
                                        replace(cfg.search, strategy=strategy))  # fmt: skip
        shift = cfg.sample.shift if cfg.sample.shift is not None else schedule_shift(self.model)
        self.sigmas = flow_sigmas(cfg.sample.steps, shift).tolist()
        self.step = 0
        self.async_reward = None
        if cfg.train.async_reward:
            from smartgrpo_fast.rewards.combine import AsyncReward

            self.async_reward = AsyncReward(self.reward)
        self._tb = None
        #: A context manager around each backward pass (``bench train`` times them).
        self.backward_timer: Any = contextlib.nullcontext
        #: The step's memory estimate (:mod:`.memory`), None where none was checked.
        self.memory_estimate = self._check_memory()
        if resume:
            self._resume()
        elif self.dist.main:
            self._start_run_folder()
        self.dist.barrier()

    def _check_memory(self) -> Any:
        """Estimate the step's device memory and raise a ConfigError naming the setting to
        lower when it exceeds ``train.memory_limit_gib`` (default: the CUDA device's memory;
        on a CPU only when that is set). Runs before the first rollout."""
        from smartgrpo_fast.train.memory import GIB, check_fits, estimate_for_trainer

        limit = self.cfg.train.memory_limit_gib
        if self.device.type == "cuda":
            resident = torch.cuda.memory_allocated(self.device)
            total = torch.cuda.get_device_properties(self.device).total_memory
            where = f"{self.device} ({torch.cuda.get_device_name(self.device)})"
        elif limit is not None:
            resident = _module_bytes(self.model, self.search_model, self.reward, self.search_reward)
            total, where = None, "the limit"
        else:
            return None
        if not hasattr(getattr(self.model, "transformer", None), "config"):
            return None
        est = estimate_for_trainer(self, resident)
        if limit is not None:
            total, where = int(limit * GIB), f"train.memory_limit_gib = {limit:g}"
        check_fits(est, total, where)
        return est

    # ------------------------------------------------------------------ run folder

    def _start_run_folder(self) -> None:
        metrics = self.out / "metrics.jsonl"
        if latest_checkpoint(self.out) is not None or (
            metrics.is_file() and metrics.stat().st_size
        ):
            raise FileExistsError(
                f"out: {self.out} already holds a run; resume it with --resume {self.out} "
                "or choose another folder"
            )
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "metrics.jsonl").write_text("")
        (self.out / "eval.jsonl").write_text("")
        self._write_config()

    def _write_config(self) -> None:
        text = yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False)
        (self.out / "config.yaml").write_text(text)

    def _identity(self) -> dict[str, Any]:
        return {
            "model.name": self.cfg.model.name,
            "reward": self.cfg.reward,
            "lora": None if self.cfg.lora is None else config_to_dict(self.cfg.lora),
        }

    def _resume(self) -> None:
        read = newest_readable_checkpoint(self.out, self.device, warn=log.warning)
        folder, state = read.folder, read.state
        for key in _IDENTITY:
            saved, now = state["identity"].get(key), self._identity()[key]
            if saved != now:
                raise ConfigError(f"{key}: the checkpoint {folder} was trained with {saved!r}, "
                                  f"this run has {now!r}")  # fmt: skip
        if self.cfg.lora is not None:
            load_adapter(self.model, folder / "adapter")
        else:
            from safetensors.torch import load_file

            weights = load_file(folder / "transformer.safetensors", device=str(self.device))
            with torch.no_grad():
                for n, p in zip(self.names, self.params, strict=True):
                    p.copy_(weights[n])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            for e, saved in zip(self.ema, state["ema"], strict=True):
                e.copy_(saved)
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if self.device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), self.device)
        self.step = int(state["step"])
        if self.dist.main:
            for name in ("metrics.jsonl", "eval.jsonl"):
                f = self.out / name
                lines = f.read_text().splitlines() if f.is_file() else []
                keep = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= self.step]
                f.write_text("".join(ln + "\n" for ln in keep))
            self._write_config()
        log.info("resumed %s at step %d", folder, self.step)

    def _training_state(self) -> dict[str, Any]:
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "ema": None if self.ema is None else [e.cpu() for e in self.ema],
            "rng": rng,
            "identity": self._identity(),
            "world_size": self.dist.world,
        }

    def _write_weights(self, folder: Path) -> None:
        if self.cfg.lora is not None:
            save_adapter(self.model, folder / "adapter")
            if self.cfg.model.name != "tiny":  # SD3: also diffusers' load_lora_weights format
                save_diffusers_lora(self.model, folder / "adapter")
            if self.ema is not None:
                with self._ema_weights():
                    save_adapter(self.model, folder / "adapter_ema")
        else:
            from safetensors.torch import save_file

            state = {n: p.detach().contiguous().cpu() for n, p in zip(self.names, self.params,
                                                                        strict=True)}  # fmt: skip
            save_file(state, folder / "transformer.safetensors")

    @contextlib.contextmanager
    def _ema_weights(self):
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, e in zip(self.params, self.ema, strict=True):
                p.copy_(e)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved, strict=True):
                    p.copy_(s)

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (rank 0; others wait)."""
        path = None
        if self.dist.main:
            path = save_checkpoint(self.out, self.step, write_weights=self._write_weights,
                                   state=self._training_state(),
                                   keep_last=self.cfg.train.keep_last)  # fmt: skip
        self.dist.barrier()
        return path

    # ------------------------------------------------------------------ one step

    def _lr(self, step: int) -> float:
        w = self.cfg.train.warmup_steps
        return self.cfg.train.lr * (min(1.0, step / w) if w else 1.0)

    @contextlib.contextmanager
    def _policy_forward(self):
        """Training forwards go through DDP (gradient averaging) when there is one."""
        if self.ddp is None:
            yield
            return
        inner = self.model.transformer
        self.model.transformer = self.ddp
        try:
            yield
        finally:
            self.model.transformer = inner

    def rollouts(self, step: int) -> Rollouts:
        """The rollouts of optimizer step ``step`` on this process (no update)."""
        cfg, s = self.cfg, self.cfg.sample
        per = s.prompts_per_step // self.dist.world
        prompts = self.prompts.batch(step, s.prompts_per_step)
        first = self.dist.rank * per
        window = sde_window(cfg.seed, step, s.sde_window_size, *s.sde_window_range)
        return sample_rollouts(
            self.model, self.reward, prompts[first : first + per],
            first_prompt=first, group_size=s.group_size, step=step, seed=cfg.seed,
            sigmas=self.sigmas, sde_steps=window, noise=cfg.noise, searcher=self.searcher,
            noise_level=s.noise_level, sde_type=s.sde_type, batch=s.batch,
            async_reward=self.async_reward, shared_initial_noise=s.shared_initial_noise,
            search_steps=s.search_steps, search_steps_at=s.search_steps_at,
            reuse_velocity=s.reuse_search_velocity,
        )  # fmt: skip

    def policy_log_probs(
        self, ro: Rollouts, rows: slice | list[int], j: int
    ) -> tuple[torch.Tensor, Any]:
        """(n,) log-probability of the stored next latents of ``rows`` (a slice or row
        indices) at SDE step ``j`` under the current policy, with gradient; and the step's
        Gaussian."""
        idx = _row_list(rows)
        i = ro.sde_steps[j]
        s, s_next = ro.sigmas[i], ro.sigmas[i + 1]
        x = _take(ro.latents, rows, idx, j)
        with self._policy_forward():
            v = self.model.velocity(x, s, ro.cond.select(idx))
        st = sde_step(x, v, s, s_next, noise_level=self.cfg.sample.noise_level,
                      sigma_max=ro.sigmas[1], sde_type=self.cfg.sample.sde_type)  # fmt: skip
        return sde_log_prob(_take(ro.next_latents, rows, idx, j), st), st

    def _kl(self, ro: Rollouts, rows: slice | list[int], j: int, st: Any) -> torch.Tensor:
        """(n,) KL of the policy's step to the adapter-disabled model's, with gradient through
        the policy's mean, as Flow-GRPO computes it: mean over elements of (mean - mean_ref)^2
        / (2 std_dev_t^2), where std_dev_t is the step's noise scale *before* the sqrt(-dt)
        factor for ``sde`` (``noise_level * sqrt(sigma / (1 - sigma'))``; the Gaussian's own
        std is std_dev_t * sqrt(-dt)) and the Gaussian's std for ``cps``
        (``sigma_next * sin(noise_level * pi / 2)``)."""
        idx = _row_list(rows)
        i = ro.sde_steps[j]
        s, s_next = ro.sigmas[i], ro.sigmas[i + 1]
        x = _take(ro.latents, rows, idx, j)
        with torch.no_grad(), adapter_disabled(self.model):
            v_ref = self.model.velocity(x, s, ro.cond.select(idx))
        ref = sde_step(x, v_ref, s, s_next, noise_level=self.cfg.sample.noise_level,
                       sigma_max=ro.sigmas[1], sde_type=self.cfg.sample.sde_type)  # fmt: skip
        std_dev_t = st.std / math.sqrt(s - s_next) if st.kind == "sde" else st.std
        return ((st.mean - ref.mean) ** 2).flatten(1).mean(1) / (2 * std_dev_t**2)

    def advantages(self, rewards: torch.Tensor, groups: torch.Tensor) -> Advantages:
        """The config's GRPO advantages of (R,) rewards in (R,) groups (all processes' rows)."""
        t = self.cfg.train
        return group_advantages(rewards, groups, adv_clip=t.adv_clip, global_std=t.global_std)

    def backward(
        self, ro: Rollouts, advantages: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Zero the gradients and accumulate those of the GRPO loss into the trainable
        parameters' ``.grad``, unclipped. Rows whose advantage is 0 (a group without spread, a
        non-finite reward) carry no policy gradient and are dropped first, as Flow-GRPO does
        (``advantages.abs().sum(1) != 0``); the loss is the mean over the kept rows of all
        processes and the SDE steps (micro-batches of ``train.micro_batch`` kept rows; the
        gradient does not depend on it). Returns (6,) float64 sums over the kept rows of the
        per-sample loss, policy loss, KL, clipped, approx KL and ratio, the largest
        ``logp_diff`` and the number of rows kept on all processes."""
        cfg = self.cfg.train
        w = len(ro.sde_steps)
        kept = torch.nonzero(advantages.detach().cpu() != 0).flatten().tolist()
        n_all = int(self.dist.reduce(torch.tensor(len(kept), device=self.device), "sum"))
        sums = torch.zeros(6, dtype=torch.float64, device=self.device)
        diff_max = torch.zeros((), dtype=torch.float64, device=self.device)
        self.optimizer.zero_grad(set_to_none=True)
        if n_all == 0:
            return sums, diff_max, 0
        # DDP averages the processes' gradients: each divides by the kept rows of all of them
        # over the number of processes, so that the average is the mean over all kept rows.
        total = n_all * w / self.dist.world
        weight = 1.0
        if not kept and self.ddp is not None:  # still join the gradient all-reduce, with 0
            kept, weight = [0], 0.0
        batches = [kept[lo : lo + cfg.micro_batch] for lo in range(0, len(kept), cfg.micro_batch)]
        pairs = [(b, j) for b in batches for j in range(w)]
        for n, (rows, j) in enumerate(pairs):
            sync = self.ddp is None or n == len(pairs) - 1
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                logp, st = self.policy_log_probs(ro, rows, j)
                index = torch.as_tensor(rows, device=advantages.device)
                old = ro.log_probs[torch.as_tensor(rows, device=ro.log_probs.device), j]
                loss, stats = policy_terms(logp, old, advantages[index].to(logp.device),
                                           cfg.clip_range)  # fmt: skip
                kl = self._kl(ro, rows, j, st) if cfg.kl_beta > 0 else torch.zeros_like(loss)
                per_sample = loss + cfg.kl_beta * kl
                with self.backward_timer():
                    (weight * per_sample.sum() / total).backward()
            if weight:
                sums += torch.stack([
                    per_sample.detach().sum(), loss.detach().sum(), kl.detach().sum(),
                    stats["clipped"].sum(), stats["approx_kl"].sum(), stats["ratio"].sum(),
                ]).double()  # fmt: skip
                diff_max = torch.maximum(diff_max, stats["logp_diff"].max().double())
        return sums, diff_max, n_all

    def update(self, ro: Rollouts, advantages: torch.Tensor) -> dict[str, float]:
        """One optimizer step on the rollouts; returns the update's metrics (averages over the
        rows kept, ``rows_kept`` of all processes; without any, no optimizer step)."""
        cfg = self.cfg.train
        sums, diff_max, n_all = self.backward(ro, advantages)
        lr = self._lr(self.step + 1)
        grad_norm = torch.zeros(())
        if n_all:
            clip = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        if self.ema is not None and (self.step + 1) % cfg.ema_every == 0:
            decay = ema_decay_at(self.step + 1, cfg.ema_decay)
            with torch.no_grad():
                torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1.0 - decay)
        sums = self.dist.reduce(sums, "sum") / max(n_all * len(ro.sde_steps), 1)
        diff_max = self.dist.reduce(diff_max, "max")
        return {
            "loss": float(sums[0]), "policy_loss": float(sums[1]), "kl": float(sums[2]),
            "clip_frac": float(sums[3]), "approx_kl": float(sums[4]),
            "ratio_mean": float(sums[5]) if n_all else 1.0, "logp_diff_max": float(diff_max),
            "grad_norm": float(grad_norm), "lr": lr, "rows_kept": n_all,
        }  # fmt: skip

    def train_step(self) -> dict[str, Any]:
        """Rollouts, advantages and one optimizer step; returns the step's metrics line."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        step = self.step + 1
        ro = self.rollouts(step)
        rewards = self.dist.gather(ro.rewards)
        groups = self.dist.gather(ro.groups)
        adv = self.advantages(rewards, groups)
        lo = self.dist.rank * ro.size
        t1 = time.perf_counter()
        upd = self.update(ro, adv.values[lo : lo + ro.size].to(self.device))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t2 = time.perf_counter()
        self.step = step
        finite = rewards[torch.isfinite(rewards)]
        cols = [ro.sde_steps.index(i) for i in ro.searched_steps]
        searched = ro.search_gain[:, cols] if cols else torch.zeros_like(ro.search_gain[:, :1])
        gain = self.dist.gather(searched.mean().reshape(1)).mean()
        line = {
            "step": step,
            "reward_mean": float(finite.mean()) if finite.numel() else float("nan"),
            "reward_std": float(finite.std(unbiased=False)) if finite.numel() else float("nan"),
            **upd,
            "zero_std_frac": adv.zero_std_frac,
            "nonfinite_rewards": adv.nonfinite,
            "search_gain": float(gain),
            "time_search": ro.seconds["search"],
            "time_rollout": ro.seconds["rollout"],
            "time_reward": ro.seconds["reward"],
            "time_update": t2 - t1,
            "time_step": t2 - t0,
            "peak_mem_bytes": _peak_memory(self.device),
            "world_size": self.dist.world,
            "sde_steps": ro.sde_steps,
            "model_calls_per_rollout": ro.model_calls,
        }
        return line

    # ------------------------------------------------------------------ evaluation, logging

    def evaluate(self) -> dict[str, Any]:
        """Sample the held-out prompts with the ODE from fixed noise (rank 0), write the grid
        ``samples/step-NNNNNN.png`` and ``eval.jsonl``; return the eval metrics."""
        out: dict[str, Any] = {}
        if self.dist.main:
            e = self.cfg.eval
            res = evaluate(self.model, self.reward, self.eval_prompts,
                           EvalConfig(steps=e.steps, seed=e.seed, batch=e.batch,
                                      images_per_prompt=e.images_per_prompt))  # fmt: skip
            out = {"step": self.step, "eval_reward_mean": res.mean}
            if res.matches is not None:
                out["eval_match_rate"] = res.match_rate
            samples = self.out / "samples"
            samples.mkdir(exist_ok=True)
            per_image = res.rewards if res.image_rewards is None else res.image_rewards
            save_grid(res.images, samples / f"step-{self.step:06d}.png", nrow=res.grid_nrow,
                      labels=reward_labels(per_image, res.grid_nrow))  # fmt: skip
            with open(self.out / "eval.jsonl", "a") as f:
                f.write(json.dumps(out) + "\n")
        self.dist.barrier()
        return out

    def _log(self, line: dict[str, Any]) -> None:
        if not self.dist.main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        if self.cfg.log.tensorboard:
            if self._tb is None:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out / "tensorboard"))
            for k, v in line.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"train/{k}", v, line["step"])
            self._tb.flush()

    def train(self) -> None:
        """Run until ``train.steps``, evaluating and checkpointing as configured."""
        cfg = self.cfg
        bar = None
        if self.dist.main and cfg.log.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.train.steps, initial=self.step, desc=f"GRPO {cfg.noise}",
                       unit="step", dynamic_ncols=True)  # fmt: skip
        every = cfg.eval.every
        try:
            if self.step == 0 and every:
                self.evaluate()
            while self.step < cfg.train.steps:
                line = self.train_step()
                if every and self.step % every == 0:
                    line |= {k: v for k, v in self.evaluate().items() if k != "step"}
                self._log(line)
                if self.step % cfg.train.save_every == 0 or self.step == cfg.train.steps:
                    self.save()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(reward=f"{line['reward_mean']:.3f}",
                                    loss=f"{line['loss']:.4f}")  # fmt: skip
        finally:
            if bar is not None:
                bar.close()
            self.close()

    def close(self) -> None:
        """Stop the reward worker and the TensorBoard writer."""
        if self.async_reward is not None:
            self.async_reward.close()
            self.async_reward = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def shutdown(self) -> None:
        """:meth:`close`, then leave the process group: the DDP wrapper goes first, so that its
        reducer, freed with the GIL held, is not the last owner of the gloo process group,
        whose destructor joins worker threads that may need the GIL (a deadlock at exit seen
        under load; pytorch/pytorch#56297); ``destroy_process_group`` then frees the group
        through its binding, which releases the GIL."""
        self.close()
        if self.ddp is not None:
            self.ddp = None
            gc.collect()  # a module's reference cycles: free the reducer now, not at exit
        self.dist.close()
