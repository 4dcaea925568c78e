"""The embedded flow model: diffusers' SD3Transformer2DModel in pixel space, and its text encoder.

* Pixels are the latent: ``latent_shape = (3, 32, 32)`` in [-1, 1], ``scaling = 1``,
  ``shift = 0``; :meth:`TinyFlowModel.decode` maps [-1, 1] to [0, 1].
* :class:`TinyTextEncoder` turns the 7 words of a prompt into ``encoder_hidden_states``
  (7, 64) — word embedding + a learned position embedding (SD3 gives text tokens none, and a
  colour word appears twice: position tells the shape's colour from the background's) + one
  transformer layer — and a ``pooled`` (64,) vector computed by an MLP over all 7 tokens (a mean
  could not tell which colour belongs to the shape).
* The transformer is the SD3 MMDiT (6 layers, width 128, patch 4: 64 image tokens), trained
  with SD3's rectified-flow objective (``x_t = (1 - t) x0 + t eps``, target ``eps - x0``), on
  the null prompt (all ``<pad>``) 10% of the time and on times shifted toward noise (shift 3,
  SD3's schedule); it samples with classifier-free guidance, scale 6 (``config.json``: best
  joint accuracy of 3, 5, 6, 7), on the shift-3 schedule (``time_shift``).

Weights ship in the package (``weights/``) as safetensors with a JSON config.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from smartgrpo_fast.graphs import GraphConfig, GraphedCallable
from smartgrpo_fast.models.base import Cond, DiTFlowModel
from smartgrpo_fast.sde import check_time_shift
from smartgrpo_fast.shapes.data import IMAGE_SIZE, PROMPT_WORDS, VOCAB, WEIGHTS_DIR, tokenize

__all__ = ["TinyArch", "TinyFlowModel", "TinyTextEncoder", "build_modules", "save_weights"]


@dataclass(frozen=True)
class TinyArch:
    """Architecture of the embedded model (saved as ``config.json`` beside the weights)."""

    text_width: int = 64
    pooled_width: int = 64
    layers: int = 6
    heads: int = 4
    head_dim: int = 32
    patch: int = 4

    def transformer_config(self) -> dict[str, Any]:
        return {
            "sample_size": IMAGE_SIZE,
            "patch_size": self.patch,
            "in_channels": 3,
            "out_channels": 3,
            "num_layers": self.layers,
            "attention_head_dim": self.head_dim,
            "num_attention_heads": self.heads,
            "joint_attention_dim": self.text_width,
            "caption_projection_dim": self.heads * self.head_dim,
            "pooled_projection_dim": self.pooled_width,
            "pos_embed_max_size": IMAGE_SIZE // self.patch,
        }


class TinyTextEncoder(nn.Module):
    """Prompt word ids (B, 7) -> (encoder_hidden_states (B, 7, D), pooled (B, P)), float32."""

    def __init__(self, arch: TinyArch) -> None:
        super().__init__()
        d = arch.text_width
        self.embed = nn.Embedding(len(VOCAB), d)
        self.position = nn.Parameter(torch.randn(PROMPT_WORDS, d) * 0.02)
        self.layer = nn.TransformerEncoderLayer(
            d, nhead=4, dim_feedforward=2 * d, dropout=0.0, batch_first=True, norm_first=True
        )
        self.norm = nn.LayerNorm(d)
        self.pool = nn.Sequential(
            nn.Linear(PROMPT_WORDS * d, 2 * d), nn.SiLU(), nn.Linear(2 * d, arch.pooled_width)
        )

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(ids) + self.position
        h = self.norm(self.layer(h))
        return h, self.pool(h.flatten(1))


def build_modules(arch: TinyArch, seed: int = 0) -> tuple[Any, TinyTextEncoder]:
    """Randomly initialised (transformer, text encoder), deterministic from ``seed``."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(**arch.transformer_config()), TinyTextEncoder(arch)


class TinyFlowModel(DiTFlowModel):
    """The embedded text-to-image flow model behind the FlowModel protocol (pixel space)."""

    scaling_factor = 1.0
    shift_factor = 0.0

    def __init__(
        self,
        transformer: Any,
        text_encoder: TinyTextEncoder,
        *,
        graph: GraphConfig | None = None,
        arch: TinyArch | None = None,
        guidance_scale: float = 1.0,
        time_shift: float = 1.0,
    ) -> None:
        if not (math.isfinite(guidance_scale) and guidance_scale >= 1.0):
            raise ValueError(f"guidance_scale: expected a finite value >= 1, got {guidance_scale}")
        self.transformer = transformer.eval().requires_grad_(False)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.arch = arch or TinyArch()
        self.device = next(transformer.parameters()).device
        self.dtype = next(transformer.parameters()).dtype
        self.latent_shape: tuple[int, int, int] = (3, IMAGE_SIZE, IMAGE_SIZE)
        self.image_size = IMAGE_SIZE
        self.guidance_scale = float(guidance_scale)
        #: The sampling schedule's time shift (``sde.schedule_shift``), that of training.
        self.time_shift = check_time_shift(time_shift, "time_shift")
        self._forward = GraphedCallable(
            self._transformer_forward, graph or GraphConfig(backend="eager")
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        graph: GraphConfig | None = None,
        weights: str = "flow.safetensors",
        guidance_scale: float | None = None,
        time_shift: float | None = None,
        lora: str | Path | None = None,
    ) -> TinyFlowModel:
        """Load the shipped weights (``path=None``) or a folder written by the trainer.

        ``weights`` picks the file: ``flow.safetensors`` (default; the raw weights at the end
        of the lr decay, the ones that ship: they matched their prompts at least as often as
        the EMA copy) or ``flow_ema.safetensors``, which the trainer also writes.
        ``guidance_scale`` > 1 samples with classifier-free guidance against the null prompt
        (all ``<pad>``; models trained with ``--uncond-prob``); default: the folder's
        ``config.json`` ``"guidance_scale"``, else 1 (off). ``time_shift``: the sampling
        schedule's shift (``sde.flow_sigmas``); default ``config.json`` ``"time_shift"`` (the
        trainer writes the shift its training times had), else 1 (uniform). ``lora``: a peft
        adapter folder (:func:`smartgrpo_fast.models.lora.save_adapter`'s) applied after
        loading (:func:`~smartgrpo_fast.models.lora.load_adapter`, needs peft).
        """
        from safetensors.torch import load_file

        folder = Path(path) if path is not None else WEIGHTS_DIR
        cfg_file, w_file = folder / "config.json", folder / weights
        for f in (cfg_file, w_file):
            if not f.is_file():
                raise FileNotFoundError(
                    f"{f}: not found; expected the embedded model's config.json and {weights} "
                    f"(python -m smartgrpo_fast.shapes.train_model writes them)"
                )
        meta = json.loads(cfg_file.read_text())
        arch = TinyArch(**meta["arch"])
        if guidance_scale is None:
            guidance_scale = float(meta.get("guidance_scale", 1.0))
        if time_shift is None:
            time_shift = float(meta.get("time_shift", 1.0))
        transformer, text_encoder = build_modules(arch)
        state = load_file(w_file)
        transformer.load_state_dict(_strip(state, "transformer."))
        text_encoder.load_state_dict(_strip(state, "text_encoder."))
        transformer.to(device)
        if dtype != torch.float32:
            transformer.to(dtype)
        text_encoder.to(device)
        model = cls(transformer, text_encoder, graph=graph, arch=arch,
                    guidance_scale=guidance_scale, time_shift=time_shift)  # fmt: skip
        if lora is not None:
            from smartgrpo_fast.models.lora import load_adapter

            load_adapter(model, lora)
        return model

    def encode_prompts(self, prompts: list[str]) -> Cond:
        """Conditioning of B prompts: (B, 7, 64) token states and (B, 64) pooled; with
        guidance on, also the null prompt's as the negative embeddings."""
        if isinstance(prompts, str) or not prompts:
            raise TypeError("prompts: expected a non-empty list of strings")
        ids = tokenize(list(prompts)).to(self.device)
        with torch.no_grad():
            h, pooled = self.text_encoder(ids)
            neg_h = neg_pooled = None
            if self.guidance_scale > 1.0:
                neg_h, neg_pooled = self.text_encoder(torch.zeros_like(ids))  # <pad> = id 0
                neg_h, neg_pooled = neg_h.to(self.dtype), neg_pooled.to(self.dtype)
        return Cond(h.to(self.dtype), pooled.to(self.dtype), neg_h, neg_pooled,
                    prompts=tuple(prompts))  # fmt: skip

    def decode(
        self, x0_latent: torch.Tensor, *, size: int | tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Images in [0, 1], float32 (N, 3, H, W), from pixels in [-1, 1]."""
        if x0_latent.dim() != 4 or x0_latent.shape[1] != 3:
            raise ValueError(f"x0_latent: expected (N, 3, H, W), got {tuple(x0_latent.shape)}")
        img = ((x0_latent.float() + 1.0) / 2.0).clamp(0.0, 1.0)
        if size is not None:
            hw = (size, size) if isinstance(size, int) else tuple(size)
            img = F.interpolate(img, size=hw, mode="bilinear", antialias=True, align_corners=False)
        return img.clamp(0.0, 1.0)


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v.float() for k, v in state.items() if k.startswith(prefix)}


def save_weights(
    folder: str | Path,
    transformer: nn.Module,
    text_encoder: nn.Module,
    arch: TinyArch,
    *,
    name: str = "flow.safetensors",
    metadata: dict[str, str] | None = None,
    dtype: torch.dtype = torch.float16,
    config: dict[str, Any] | None = None,
) -> Path:
    """Write ``config.json`` (``arch``, the keys of ``config``, and other keys already there,
    such as a measured ``guidance_scale``) and the two modules' weights (one safetensors file,
    ``dtype``)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg_file = folder / "config.json"
    meta = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    meta |= {"arch": asdict(arch), **(config or {})}
    cfg_file.write_text(json.dumps(meta, indent=1) + "\n")
    state = {f"transformer.{k}": v for k, v in transformer.state_dict().items()}
    state |= {f"text_encoder.{k}": v for k, v in text_encoder.state_dict().items()}
    state = {k: v.detach().to(dtype).contiguous().cpu() for k, v in state.items()}
    save_file(state, folder / name, metadata=metadata)
    return folder / name
