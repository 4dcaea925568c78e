"""Stable Diffusion 3 / 3.5 as a :class:`~smartgrpo_fast.models.base.FlowModel`, via diffusers.

The adapter owns the diffusers components (transformer, VAE, scheduler config and the three
text encoders with their tokenizers, held by one ``StableDiffusion3Pipeline`` for its
``encode_prompt``) and converts the flow time ``t`` in [0, 1] to diffusers' timestep
``1000 * t``. Velocity for K candidates per prompt runs as one batched forward; the transformer
forward can be CUDA-graphed or compiled (:mod:`smartgrpo_fast.graphs`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from smartgrpo_fast.graphs import GraphConfig, GraphedCallable
from smartgrpo_fast.models.base import Cond, DiTFlowModel, decoder_unscaling

__all__ = [
    "PREVIEW_DECODER_CLASS",
    "SEARCH_DTYPES",
    "SD3Config",
    "SD3FlowModel",
    "load_preview_decoder",
]

#: The transformers a search's forwards may run on: the model's own, or a float8 copy.
SEARCH_DTYPES = ("model", "float8")

#: The diffusers class a preview decoder folder must hold (TAESD3's layout).
PREVIEW_DECODER_CLASS = "AutoencoderTiny"

_COMPONENTS = (
    "transformer",
    "vae",
    "scheduler",
    "text_encoder",
    "tokenizer",
    "text_encoder_2",
    "tokenizer_2",
    "text_encoder_3",
    "tokenizer_3",
)
_ATTENTION = ("sdpa", "xformers")


@dataclass(frozen=True)
class SD3Config:
    """Options of :class:`SD3FlowModel`.

    Attributes:
        max_sequence_length: T5 tokens per prompt (Flow-GRPO uses 128).
        guidance_scale: classifier-free guidance weight; 1.0 = off (one forward per row).
        attention: ``sdpa`` (PyTorch scaled-dot-product attention, default) or ``xformers``
            (used only when its kernels really load; otherwise an error says why).
        graph: how the transformer forward runs: eager, CUDA graph or torch.compile.
        release_text_encoders: drop the text encoders after each ``encode_prompts`` (frees
            their memory; later prompts must come from the embedding cache).
        embedding_cache: a folder for prompt embeddings in safetensors, keyed by model and
            prompt; None disables the cache.
        resolution: image side in pixels (Flow-GRPO trains SD3.5 at 512); None = the
            transformer's ``sample_size`` times the VAE factor (1024 for SD3/SD3.5).
    """

    max_sequence_length: int = 128
    guidance_scale: float = 1.0
    attention: str = "sdpa"
    graph: GraphConfig = field(default_factory=lambda: GraphConfig(backend="eager"))
    release_text_encoders: bool = False
    embedding_cache: str | None = None
    resolution: int | None = None

    def __post_init__(self) -> None:
        if self.max_sequence_length < 1:
            raise ValueError(f"max_sequence_length: expected >= 1, got {self.max_sequence_length}")
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 1.0:
            raise ValueError(
                f"guidance_scale: expected a finite value >= 1, got {self.guidance_scale}"
            )
        if self.resolution is not None and self.resolution < 1:
            raise ValueError(f"resolution: expected a positive pixel count, got {self.resolution}")
        if self.attention not in _ATTENTION:
            raise ValueError(f"attention: expected one of {_ATTENTION}, got {self.attention!r}")


def _check_layout(path: Path) -> None:
    """Raise FileNotFoundError naming the first missing file of a StableDiffusion3 layout."""
    index = path / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(
            f"{index}: not found; expected a StableDiffusion3Pipeline folder "
            f"(model_index.json with {', '.join(_COMPONENTS)})"
        )
    meta = json.loads(index.read_text())
    cls = meta.get("_class_name", "")
    if cls not in ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline"):
        raise ValueError(
            f"{index}: _class_name is {cls!r}; expected StableDiffusion3Pipeline "
            f"(the SD3-medium, SD3.5-medium and SD3.5-large layouts)"
        )
    for name in _COMPONENTS:
        if name not in meta or meta[name] in (None, [None, None]):
            raise ValueError(
                f"{index}: component {name!r} missing; expected {', '.join(_COMPONENTS)}"
            )
        folder = path / name
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: not found (component {name!r} of {index})")
        if name.startswith(("transformer", "vae", "text_encoder")):
            if not (folder / "config.json").is_file():
                raise FileNotFoundError(f"{folder / 'config.json'}: not found")
            weights = [*folder.glob("*.safetensors"), *folder.glob("*.bin")]
            if not weights:
                raise FileNotFoundError(
                    f"{folder}: no weights (*.safetensors or *.bin) for component {name!r}"
                )


def _read_config(file: Path, what: str) -> dict[str, Any]:
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file}: not valid JSON ({exc}); expected {what}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{file}: expected a JSON object ({what})")
    return meta


def _check_preview_layout(path: Path, latent_channels: int) -> None:
    """Raise FileNotFoundError or ValueError naming the file (and the field) of a preview
    decoder folder that is missing or does not fit latents of ``latent_channels``."""
    what = f"a diffusers {PREVIEW_DECODER_CLASS} folder such as TAESD3 (config.json, weights)"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder; preview_decoder expects {what}")
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: not found; preview_decoder expects {what}")
    meta = _read_config(file, what)
    cls = meta.get("_class_name")
    if cls != PREVIEW_DECODER_CLASS:
        raise ValueError(
            f"{file}: _class_name is {cls!r}; expected {PREVIEW_DECODER_CLASS!r} ({what})"
        )
    channels = meta.get("latent_channels", 4)  # AutoencoderTiny's default
    if channels != latent_channels:
        raise ValueError(
            f"{file}: latent_channels is {channels!r}; the model's latents have "
            f"{latent_channels} channels (SD3 / SD3.5: 16, the TAESD3 layout)"
        )
    if not [*path.glob("*.safetensors"), *path.glob("*.bin")]:
        raise FileNotFoundError(f"{path}: no weights (*.safetensors or *.bin) beside {file}")


def load_preview_decoder(
    path: str | Path,
    *,
    latent_channels: int = 16,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Any:
    """diffusers' ``AutoencoderTiny`` from a local folder (``local_files_only``), checked first:
    a missing folder, config or weights, another class, or latent channels other than
    ``latent_channels`` is an error naming the file and the field."""
    path = Path(path).expanduser()
    _check_preview_layout(path, latent_channels)
    # AutoencoderTiny saves ``block_out_channels`` into its config and then warns, on
    # loading, that it ignores it: diffusers' own round trip, nothing for the user to fix
    config_log = logging.getLogger("diffusers.configuration_utils")
    drop = _DropMessage("were passed to AutoencoderTiny, but are not expected")
    config_log.addFilter(drop)
    try:
        with _no_torchvision_notices():
            from diffusers import AutoencoderTiny

            decoder = AutoencoderTiny.from_pretrained(
                path, torch_dtype=dtype, local_files_only=True
            )
    finally:
        config_log.removeFilter(drop)
    return decoder.to(device).eval()


class _DropMessage(logging.Filter):
    """Drops log records whose message contains ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


class _SwappedPipe:
    """``pipe`` with another transformer; everything else (VAE, scheduler, encoders) shared."""

    def __init__(self, pipe: Any, transformer: Any) -> None:
        self._pipe, self.transformer = pipe, transformer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)


class _DropTorchvisionFallback(logging.Filter):
    """transformers' notice that an image processor falls back to PIL without torchvision:
    SD3 pipelines import the CLIP and SigLIP processors but never use them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


@contextlib.contextmanager
def _no_torchvision_notices() -> Iterator[None]:
    logger = logging.getLogger("transformers.utils.import_utils")
    drop = _DropTorchvisionFallback()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _resolve(path_or_id: str | Path, local_files_only: bool) -> Path:
    """A local folder, or the snapshot folder of a Hugging Face repo id in the local cache."""
    p = Path(path_or_id).expanduser()
    if p.exists():
        return p
    if str(path_or_id).startswith((".", "/", "~")):
        raise FileNotFoundError(f"{p}: no such folder")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path_or_id), local_files_only=local_files_only))
    except Exception as exc:  # huggingface_hub raises several types here
        where = "the local Hugging Face cache" if local_files_only else "the Hub"
        raise FileNotFoundError(
            f"{path_or_id!r}: not a folder and not found in {where} ({type(exc).__name__}: "
            f"{exc}); pass a local StableDiffusion3Pipeline folder"
        ) from None


class SD3FlowModel(DiTFlowModel):
    """SD3 / SD3.5 (diffusers) behind the FlowModel protocol.

    Build it with :meth:`from_pretrained`, or directly from a ``StableDiffusion3Pipeline``.
    ``preview_decoder``: an ``AutoencoderTiny`` (TAESD3) that decodes the search's one-step
    estimates (:meth:`decode_preview`) instead of the VAE; final images still use the VAE.
    """

    def __init__(
        self,
        pipe: Any,
        config: SD3Config | None = None,
        *,
        name: str = "sd3",
        preview_decoder: Any = None,
    ) -> None:
        self.pipe = pipe
        self.config = config or SD3Config()
        self.name = name
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.device = self.transformer.device
        self.dtype = self.transformer.dtype
        tcfg = self.transformer.config
        vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        side = tcfg.sample_size
        if self.config.resolution is not None:
            if self.config.resolution % (vae_factor * tcfg.patch_size):
                raise ValueError(
                    f"resolution: expected a multiple of {vae_factor * tcfg.patch_size} "
                    f"(VAE factor x patch size), got {self.config.resolution}"
                )
            side = self.config.resolution // vae_factor
        self.latent_shape: tuple[int, int, int] = (tcfg.in_channels, side, side)
        self.image_size: int = side * vae_factor
        self.vae_scale_factor = vae_factor
        if self.config.attention == "xformers":
            self._enable_xformers()
        self._forward = GraphedCallable(self._transformer_forward, self.config.graph)
        self.guidance_scale = self.config.guidance_scale
        self.preview_decoder: Any = None
        if preview_decoder is not None:
            self.set_preview_decoder(preview_decoder)

    def set_preview_decoder(self, decoder: Any) -> None:
        """Decode the search's estimates with ``decoder`` (an ``AutoencoderTiny``; None: the
        VAE again). Its config's ``latent_channels`` must be the model's."""
        if decoder is not None:
            channels = getattr(decoder.config, "latent_channels", None)
            if channels != self.latent_shape[0]:
                raise ValueError(
                    f"preview_decoder: config latent_channels is {channels!r}; the model's "
                    f"latents have {self.latent_shape[0]} channels"
                )
            decoder.requires_grad_(False)
        self.preview_decoder = decoder

    def with_transformer(self, transformer: Any) -> SD3FlowModel:
        """A model that shares this one's VAE, preview decoder, encoders and options but runs
        ``transformer`` (e.g. a float8 copy; its own graphed or compiled forward)."""
        model = SD3FlowModel(_SwappedPipe(self.pipe, transformer), self.config,
                             name=self.name, preview_decoder=self.preview_decoder)  # fmt: skip
        # the compute dtype of the inputs stays this model's (a quantized copy's parameters
        # may report their storage dtype)
        model.dtype = self.dtype
        return model

    def for_search(self, search_dtype: str = "model") -> SD3FlowModel:
        """The model whose forwards score a search's candidates: this one (``"model"``), or
        one sharing everything but a float8 copy of the transformer (``"float8"``,
        :func:`~smartgrpo_fast.models.fp8.float8_transformer`: CUDA, compute capability >= 8.9,
        torchao). Never the rollout's steps, log-probabilities or training. A LoRA adapter on
        the transformer is shared with the copy (the same tensors), so the copy follows the
        adapter's training; the copy is made once per adapter (again after ``attach_lora``),
        and does not follow a change of the base weights (full fine-tuning)."""
        if search_dtype not in SEARCH_DTYPES:
            raise ValueError(
                f"search_dtype: expected one of {', '.join(SEARCH_DTYPES)}, got {search_dtype!r}"
            )
        if search_dtype == "model":
            return self
        from smartgrpo_fast.models.fp8 import adapter_key, float8_transformer

        key = adapter_key(self.transformer)
        cached = getattr(self, "_float8", None)
        if cached is None or cached[0] != key:
            self._float8 = (key, self.with_transformer(float8_transformer(self.transformer)))
        return self._float8[1]

    # ----------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        local_files_only: bool = True,
        attention: str | None = None,
        config: SD3Config | None = None,
        lora: str | Path | None = None,
        preview_decoder: str | Path | None = None,
        preview_dtype: torch.dtype | None = None,
    ) -> SD3FlowModel:
        """Load a StableDiffusion3Pipeline folder (or a repo id in the HF cache).

        The VAE stays in float32 (Flow-GRPO's habit: bf16 decoding bands); the transformer and
        text encoders use ``dtype``. ``attention`` (``sdpa`` or ``xformers``) overrides
        ``config.attention`` when given. A missing file or an unknown layout is a clear error that
        names the file and the folder. ``lora``: a peft adapter folder
        (:func:`smartgrpo_fast.models.lora.save_adapter`'s) applied to the transformer after
        loading (:func:`~smartgrpo_fast.models.lora.load_adapter`; adapter weights in float32).
        ``preview_decoder``: a local ``AutoencoderTiny`` folder (TAESD3) for the search's
        estimates (:func:`load_preview_decoder`: checked before anything is loaded), in
        ``preview_dtype`` (default ``dtype``: TAESD is made for half precision).
        """
        path = _resolve(path_or_id, local_files_only)
        _check_layout(path)  # before diffusers is imported: a bad path fails fast and quietly
        if preview_decoder is not None:
            index = path / "transformer" / "config.json"
            channels = _read_config(index, "the transformer's config").get("in_channels", 16)
            _check_preview_layout(Path(preview_decoder).expanduser(), channels)
        with _no_torchvision_notices():
            from diffusers import StableDiffusion3Pipeline

            pipe = StableDiffusion3Pipeline.from_pretrained(
                path, dtype={"vae": torch.float32, "default": dtype}, local_files_only=True
            )
        pipe.set_progress_bar_config(disable=True)
        pipe.to(device)
        cfg = config or SD3Config()
        if attention is not None:
            cfg = replace(cfg, attention=attention)
        preview = None
        if preview_decoder is not None:
            preview = load_preview_decoder(
                preview_decoder,
                latent_channels=pipe.transformer.config.in_channels,
                dtype=dtype if preview_dtype is None else preview_dtype,
                device=device,
            )
        model = cls(pipe, cfg, name=str(path), preview_decoder=preview)
        if lora is not None:
            from smartgrpo_fast.models.lora import load_adapter

            load_adapter(model, lora)
        return model

    def _enable_xformers(self) -> None:
        try:
            import xformers.ops as xops

            q = torch.zeros(1, 4, 1, 8, device=self.device, dtype=self.dtype)
            xops.memory_efficient_attention(q, q, q)  # really loads its kernels
            self.transformer.enable_xformers_memory_efficient_attention()
        except Exception as exc:
            raise RuntimeError(
                f"attention='xformers': xformers cannot run here ({type(exc).__name__}: {exc}); "
                f"use attention='sdpa'"
            ) from None

    # -------------------------------------------------------------------------- prompts

    @property
    def scaling_factor(self) -> float:
        """The VAE's scaling factor (``x0_estimate``'s ``scaling`` before :meth:`decode`)."""
        return decoder_unscaling(self.vae.config)[0]

    @property
    def time_shift(self) -> float:
        """The scheduler's time shift (3.0 for SD3 / SD3.5): ``sde.schedule_shift``."""
        scheduler = getattr(self.pipe, "scheduler", None)
        return float(getattr(getattr(scheduler, "config", None), "shift", 3.0) or 3.0)

    @property
    def shift_factor(self) -> float:
        """The VAE's shift factor (``x0_estimate``'s ``shift`` before :meth:`decode`)."""
        return decoder_unscaling(self.vae.config)[1]

    def preview_unscaling(self) -> tuple[float, float]:
        """(scaling, shift) for :meth:`decode_preview`'s input: the preview decoder's own
        (TAESD3: 1 and 0), or the VAE's without one (:func:`~.base.decoder_unscaling`)."""
        decoder = self.vae if self.preview_decoder is None else self.preview_decoder
        return decoder_unscaling(decoder.config)

    def _cache_file(self, prompt: str) -> Path | None:
        if self.config.embedding_cache is None:
            return None
        key = json.dumps(
            [self.name, self.config.max_sequence_length, self.config.guidance_scale > 1, prompt]
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:32]
        return Path(self.config.embedding_cache) / f"{digest}.safetensors"

    def encode_prompts(self, prompts: list[str]) -> Cond:
        """Conditioning for B prompts: (B, 77 + max_sequence_length, D) embeddings and (B, P)
        pooled, plus the empty-prompt pair when guidance is on. Cached on disk when set."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts: expected a list of strings, got {type(prompts).__name__}")
        if not prompts:
            raise ValueError("prompts: expected at least one prompt")
        rows = [self._load_cached(p) for p in prompts]
        missing = [i for i, r in enumerate(rows) if r is None]
        if missing:
            fresh = self._encode([prompts[i] for i in missing])
            for j, i in enumerate(missing):
                rows[i] = {k: v[j : j + 1] for k, v in fresh.items()}
                self._store_cached(prompts[i], rows[i])
        if self.config.release_text_encoders:
            self.release_text_encoders()
        cat = {k: torch.cat([r[k] for r in rows]).to(self.device, self.dtype) for k in rows[0]}
        return Cond(
            cat["prompt_embeds"],
            cat["pooled"],
            cat.get("negative_prompt_embeds"),
            cat.get("negative_pooled"),
            tuple(prompts),
        )

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if self.pipe.text_encoder is None:
            raise RuntimeError(
                f"encode_prompts: the text encoders were released and {len(prompts)} prompt(s) "
                f"are not in the embedding cache (first: {prompts[0]!r}); reload the model"
            )
        cfg = self.config
        with torch.no_grad():
            pe, npe, pp, npp = self.pipe.encode_prompt(
                prompt=prompts,
                prompt_2=None,
                prompt_3=None,
                device=self.device,
                do_classifier_free_guidance=cfg.guidance_scale > 1.0,
                max_sequence_length=cfg.max_sequence_length,
            )
        out = {"prompt_embeds": pe, "pooled": pp}
        if cfg.guidance_scale > 1.0:
            out |= {"negative_prompt_embeds": npe, "negative_pooled": npp}
        return {k: v.detach() for k, v in out.items()}

    def _load_cached(self, prompt: str) -> dict[str, torch.Tensor] | None:
        f = self._cache_file(prompt)
        if f is None or not f.is_file():
            return None
        from safetensors.torch import load_file

        return load_file(f)

    def _store_cached(self, prompt: str, row: dict[str, torch.Tensor]) -> None:
        f = self._cache_file(prompt)
        if f is None:
            return
        from safetensors.torch import save_file

        f.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous().cpu() for k, v in row.items()}, f, metadata={"prompt": prompt})

    def release_text_encoders(self) -> None:
        """Drop the three text encoders (their memory is freed once nothing else holds them)."""
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            setattr(self.pipe, name, None)

    # ---------------------------------------------------------------------------- decode

    def decode(
        self, x0_latent: torch.Tensor, *, size: int | tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Images in [0, 1], float32 (N, 3, H, W), from latents already un-scaled by
        ``x0_estimate(..., scaling=self.scaling_factor, shift=self.shift_factor)``.

        ``size`` resizes (bilinear, antialiased) to a reward's input size.
        """
        return self._decode_with(self.vae, x0_latent, size)

    def decode_preview(
        self, x0_latent: torch.Tensor, *, size: int | tuple[int, int] | None = None
    ) -> torch.Tensor:
        """:meth:`decode` through the preview decoder (the VAE when there is none), from
        latents un-scaled by :meth:`preview_unscaling`: the search's candidates."""
        decoder = self.vae if self.preview_decoder is None else self.preview_decoder
        return self._decode_with(decoder, x0_latent, size)

    def _decode_with(
        self, decoder: Any, x0_latent: torch.Tensor, size: int | tuple[int, int] | None
    ) -> torch.Tensor:
        """``decoder.decode`` in its own dtype, then diffusers' output range [-1, 1] (the VAE's
        and ``AutoencoderTiny``'s, whose last layer maps [0, 1] there) to [0, 1]."""
        if x0_latent.dim() != 4 or x0_latent.shape[1] != self.latent_shape[0]:
            raise ValueError(
                f"x0_latent: expected (N, {self.latent_shape[0]}, H, W), "
                f"got shape {tuple(x0_latent.shape)}"
            )
        with torch.no_grad():
            img = decoder.decode(x0_latent.to(decoder.dtype), return_dict=False)[0]
        img = (img.float() / 2 + 0.5).clamp(0, 1)
        if size is not None:
            hw = (size, size) if isinstance(size, int) else tuple(size)
            img = F.interpolate(img, size=hw, mode="bilinear", antialias=True, align_corners=False)
            img = img.clamp(0, 1)
        return img
