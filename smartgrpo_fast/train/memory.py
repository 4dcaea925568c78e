"""What a GRPO step will hold in device memory, estimated before the first rollout.

:func:`estimate_step_memory` is plain arithmetic on the step's shapes (unit-tested);
:func:`estimate_for_trainer` reads them from a built trainer (the resident weights are
measured, everything else is estimated) and :func:`check_fits` turns an estimate that exceeds
the device into a :class:`~.config.ConfigError` naming the setting to lower. The terms:

* ``resident``: what is allocated once the model, the reward and the adapter are built
  (measured: ``torch.cuda.memory_allocated``), less the text encoders when
  ``model.release_text_encoders`` frees them after the first encoding;
* ``optimizer``: gradients (one copy of the trained parameters), AdamW's two moments and the
  EMA copy;
* ``rollout_store``: the stored latents before and after each SDE step (float32: the ratio
  test needs the exact x_next; 2 x R x W x latent elements x 4 bytes, 34 MB for 32 rollouts
  of SD3.5 at 512 px, window 2) and the decoded final images (R x 3 x H x W x 4 bytes);
* ``search``: one search round of ``sample.batch`` rollouts x K candidates: the transformer's
  no-grad forward (``FWD_LIVE`` hidden-sized tensors per token alive at once) and the VAE
  decode of B*K latents at full resolution (``DECODE_BYTES_PER_PIXEL`` per output pixel, in
  float32: a decoder block at full resolution holds its input, a normalised copy and the
  activation; measured on CPU, 4.6 KB per pixel for one 256 px image, allocator slack
  included); with CUDA graphs the round's memory stays reserved in the graph pool. With a
  preview decoder (``model.preview_decoder``, TAESD3's ``AutoencoderTiny`` layout) the round
  decodes with it instead: ``PREVIEW_DECODE_BYTES_PER_PIXEL`` per output pixel in float32,
  scaled to the transformer's dtype (the decoder runs in it). Measured on CPU as the VAE's
  (peak RSS over one no-grad decode of a random full-size TAESD3, float32, in a fresh
  process): 1.1 KB per pixel at 512 px, 1.8 KB at 256 px where the allocator's slack weighs
  more; its layers agree: at full resolution three 64-channel tensors are alive at once (a
  block's input, its convolution's output and the skip sum), 768 B per pixel in float32;
* ``rollout``: a sampling forward of ``sample.batch`` rows and the final decode of as many
  images (graph pool too under ``model.graph: graph``);
* ``training``: a micro-batch's training forward kept for backward: without gradient
  checkpointing ``TRAIN_LIVE`` hidden-sized values per token and layer (Korthikanti et al.'s
  34 bytes per token and width at 16 bits, attention without the s^2 term as SDPA's flash and
  memory-efficient kernels keep none); with checkpointing the layer inputs (2 per token and
  layer: image and text streams) plus one layer's full activations; plus the KL reference
  forward (no grad).

Peak = resident + optimizer + rollout_store + the phases that coexist: under CUDA graphs the
search and rollout pools stay allocated while training runs (their sum with training), else
the largest phase. ``MARGIN`` covers fragmentation and what is not modelled (reward
activations, cuDNN/cuBLAS workspaces).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from smartgrpo_fast.train.config import ConfigError

__all__ = [
    "DECODE_BYTES_PER_PIXEL",
    "PREVIEW_DECODE_BYTES_PER_PIXEL",
    "MemoryEstimate",
    "StepShape",
    "check_fits",
    "estimate_for_trainer",
    "estimate_step_memory",
]

GIB = 2**30
#: VAE decode, float32, per output pixel and image (module docstring).
DECODE_BYTES_PER_PIXEL = 4096
#: Preview decoder (TAESD3's AutoencoderTiny layout) decode, float32, per output pixel and
#: image (module docstring); scaled by ``act_bytes / 4``.
PREVIEW_DECODE_BYTES_PER_PIXEL = 1024
#: Hidden-sized values per token alive at once in a no-grad transformer forward.
FWD_LIVE = 12
#: Hidden-sized values per token and layer kept for backward, at 2 bytes each (34 bytes).
TRAIN_LIVE = 17
#: Head-room over the sum (fragmentation, workspaces, what is not modelled).
MARGIN = 1.15


@dataclass(frozen=True)
class StepShape:
    """The sizes a step's memory depends on.

    Attributes:
        layers, width: the transformer's depth and hidden width.
        image_tokens: latent tokens per row (``(H / patch) * (W / patch)``).
        text_tokens: text tokens per row (77 + T5 length for SD3).
        latent_elems: elements of one latent (C * H * W).
        image_pixels: pixels of one decoded image (H * W at full resolution).
        act_bytes: bytes per activation element (the transformer's dtype).
        vae: whether images are decoded by a VAE (False: the embedded pixel-space model).
        preview: whether the search decodes its candidates with a preview decoder (in the
            transformer's dtype, ``act_bytes``) instead of the VAE.
    """

    layers: int
    width: int
    image_tokens: int
    text_tokens: int
    latent_elems: int
    image_pixels: int
    act_bytes: int = 2
    vae: bool = True
    preview: bool = False

    @property
    def tokens(self) -> int:
        return self.image_tokens + self.text_tokens

    def row_hidden_bytes(self) -> int:
        """One row's hidden states at one layer: tokens x width x act_bytes."""
        return self.tokens * self.width * self.act_bytes


@dataclass(frozen=True)
class MemoryEstimate:
    """An estimate in bytes: its ``parts`` (name -> bytes), ``peak`` (with ``MARGIN``) and,
    for each part a setting controls, ``knobs``: part -> ``"KEY: what to do"``."""

    parts: dict[str, int]
    peak: int
    knobs: dict[str, str]

    def table(self) -> str:
        lines = [f"{name:<14} {b / GIB:>8.2f} GiB" for name, b in self.parts.items()]
        lines.append(f"{'peak (x' + str(MARGIN) + ')':<14} {self.peak / GIB:>8.2f} GiB")
        return "\n".join(lines)


def estimate_step_memory(
    shape: StepShape,
    *,
    resident_bytes: int,
    trainable_bytes: int,
    ema: bool,
    rows: int,
    window: int,
    rollout_batch: int,
    search_k: int,
    micro_batch: int,
    gradient_checkpointing: bool,
    kl: bool,
    guidance: bool = False,
    graphs: bool = False,
) -> MemoryEstimate:
    """The step's memory (module docstring) from its shapes and settings.

    Args:
        shape: the model's sizes.
        resident_bytes: weights already allocated (model, reward, adapter).
        trainable_bytes: bytes of the trained parameters (their gradient has as many; AdamW
            keeps two moments of the parameters' size; ``ema`` one more copy).
        rows: rollouts this process samples per step; ``window``: SDE steps per rollout.
        rollout_batch: rollouts sampled (and searched) together (``sample.batch``, at most
            ``rows``).
        search_k: candidates per searched rollout (0: ``noise: random``, no search).
        micro_batch: rollouts per training forward (at most ``rows``).
        gradient_checkpointing, kl: as configured (``kl``: ``train.kl_beta > 0``).
        guidance: classifier-free guidance doubles the rollout and search forwards' rows.
        graphs: rollout and search run as CUDA graphs (their memory stays reserved).
    """
    b = min(rollout_batch, rows)
    m = min(micro_batch, rows)
    cfg_rows = 2 if guidance else 1
    hidden = shape.row_hidden_bytes()
    decode = shape.image_pixels * DECODE_BYTES_PER_PIXEL if shape.vae else 0
    search_decode = decode
    if shape.vae and shape.preview:
        search_decode = shape.image_pixels * PREVIEW_DECODE_BYTES_PER_PIXEL * shape.act_bytes // 4
    parts = {
        "resident": resident_bytes,
        "optimizer": trainable_bytes * (3 + int(ema)),
        "rollout_store": rows * (2 * window * shape.latent_elems + 3 * shape.image_pixels) * 4,
        "search": b * search_k * (cfg_rows * hidden * FWD_LIVE + search_decode) if search_k else 0,
        "rollout": b * (cfg_rows * hidden * FWD_LIVE + decode),
    }
    if gradient_checkpointing:
        train = m * hidden * (2 * shape.layers + TRAIN_LIVE)
    else:
        train = m * hidden * TRAIN_LIVE * shape.layers
    parts["training"] = train + (m * hidden * FWD_LIVE if kl else 0)
    fixed = parts["resident"] + parts["optimizer"] + parts["rollout_store"]
    if graphs:
        phases = parts["search"] + parts["rollout"] + parts["training"]
    else:
        phases = max(parts["search"], parts["rollout"], parts["training"])
    knobs = {
        "search": "sample.batch: lower it (a search round decodes sample.batch x search.k "
        "images at once), or search.k"
        + ("" if shape.preview or not shape.vae else ", or set model.preview_decoder"),
        "rollout": "sample.batch: lower it",
        "training": "train.micro_batch: lower it"
        if gradient_checkpointing
        else "model.gradient_checkpointing: set it to true, or lower train.micro_batch",
        "resident": "model.dtype: use bfloat16, or a larger GPU",
        "optimizer": "lora.rank: lower it",
    }
    return MemoryEstimate(parts, math.ceil(MARGIN * (fixed + phases)), knobs)


def check_fits(estimate: MemoryEstimate, limit_bytes: int, where: str) -> None:
    """A :class:`ConfigError` naming the setting to lower when ``estimate.peak`` exceeds
    ``limit_bytes`` (the largest part that a setting controls decides which)."""
    if estimate.peak <= limit_bytes:
        return
    variable = {k: v for k, v in estimate.parts.items() if k in estimate.knobs and v > 0}
    part = max(variable, key=variable.get)
    key, advice = estimate.knobs[part].split(": ", 1)
    detail = ", ".join(f"{k} {v / GIB:.1f}" for k, v in estimate.parts.items() if v)
    raise ConfigError(
        f"{key}: a step needs about {estimate.peak / GIB:.1f} GiB ({detail} GiB, x{MARGIN}) "
        f"but {where} has {limit_bytes / GIB:.1f} GiB; the largest part is {part} "
        f"({estimate.parts[part] / GIB:.1f} GiB): {key}: {advice} (or raise "
        f"train.memory_limit_gib if the estimate is wrong)"
    )


def _shape_of(model: Any, act_bytes: int) -> StepShape:
    t = model.transformer.config
    c, h, w = model.latent_shape
    patch = int(t.patch_size)
    vae = getattr(model, "vae", None)
    side = int(getattr(model, "image_size", 0) or h)
    text_tokens = 77 + int(getattr(getattr(model, "config", None), "max_sequence_length", 0))
    if vae is None:  # the embedded model: its own text encoder, pixel space
        text_tokens = 8
    return StepShape(
        layers=int(t.num_layers),
        width=int(t.num_attention_heads * t.attention_head_dim),
        image_tokens=(h // patch) * (w // patch),
        text_tokens=text_tokens,
        latent_elems=c * h * w,
        image_pixels=side * side if vae is not None else h * w,
        act_bytes=act_bytes,
        vae=vae is not None,
        preview=getattr(model, "preview_decoder", None) is not None,
    )


def estimate_for_trainer(trainer: Any, resident_bytes: int) -> MemoryEstimate:
    """The estimate of ``trainer``'s step (a built :class:`~.trainer.GRPOTrainer`) given the
    bytes allocated after building it."""
    cfg = trainer.cfg
    model = trainer.model
    act_bytes = 4 if cfg.model.dtype == "float32" else 2
    if cfg.model.release_text_encoders:
        pipe = getattr(model, "pipe", None)
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            enc = getattr(pipe, name, None)
            if enc is not None:
                resident_bytes -= sum(p.numel() * p.element_size() for p in enc.parameters())
    rows = cfg.sample.prompts_per_step // trainer.dist.world * cfg.sample.group_size
    return estimate_step_memory(
        _shape_of(model, act_bytes),
        resident_bytes=max(resident_bytes, 0),
        trainable_bytes=sum(p.numel() * p.element_size() for p in trainer.params),
        ema=cfg.train.ema_decay is not None,
        rows=rows,
        window=cfg.sample.sde_window_size,
        rollout_batch=cfg.sample.batch,
        search_k=0 if cfg.noise == "random" else cfg.search.k,
        micro_batch=cfg.train.micro_batch,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        kl=cfg.train.kl_beta > 0,
        guidance=float(getattr(model, "guidance_scale", 1.0)) > 1.0,
        graphs=cfg.model.graph != "eager" and trainer.device.type == "cuda",
    )
