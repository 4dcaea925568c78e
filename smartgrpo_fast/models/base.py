"""The flow-model protocol that the search and the trainer see, and its conditioning type.

Flow time convention (SD3): ``x_t = (1 - t) x0 + t eps``, ``t`` in [0, 1], 1 = pure noise,
velocity ``v = eps - x0``. Adapters convert ``t`` to their model's own timestep convention;
nothing above them sees it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = [
    "Cond",
    "DiTFlowModel",
    "FlowModel",
    "decode_latents",
    "decoder_unscaling",
    "has_preview_decoder",
    "preview_decode",
    "preview_unscaling",
    "repeat_rows",
]


@dataclass(frozen=True)
class Cond:
    """Conditioning of B prompts.

    Attributes:
        prompt_embeds: (B, L, D) token embeddings (SD3: CLIP-L ‖ CLIP-G padded, then T5).
        pooled: (B, P) pooled text embedding.
        negative_prompt_embeds: (B, L, D) for classifier-free guidance, or None.
        negative_pooled: (B, P) for classifier-free guidance, or None.
        prompts: the B prompt strings, for rewards and logs.
    """

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None
    prompts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        b = self.prompt_embeds.shape[0]
        if self.prompt_embeds.dim() != 3:
            raise ValueError(
                f"prompt_embeds: expected (B, L, D), got shape {tuple(self.prompt_embeds.shape)}"
            )
        if self.pooled.dim() != 2 or self.pooled.shape[0] != b:
            raise ValueError(f"pooled: expected ({b}, P), got shape {tuple(self.pooled.shape)}")
        if (self.negative_prompt_embeds is None) != (self.negative_pooled is None):
            raise ValueError("negative_prompt_embeds and negative_pooled: give both or neither")
        if self.negative_prompt_embeds is not None:
            if self.negative_prompt_embeds.shape != self.prompt_embeds.shape:
                raise ValueError(
                    f"negative_prompt_embeds: expected shape {tuple(self.prompt_embeds.shape)}, "
                    f"got {tuple(self.negative_prompt_embeds.shape)}"
                )
            if self.negative_pooled.shape != self.pooled.shape:
                raise ValueError(
                    f"negative_pooled: expected shape {tuple(self.pooled.shape)}, "
                    f"got {tuple(self.negative_pooled.shape)}"
                )
        if self.prompts and len(self.prompts) != b:
            raise ValueError(f"prompts: expected {b} strings, got {len(self.prompts)}")

    @property
    def batch(self) -> int:
        """B, the number of prompts."""
        return self.prompt_embeds.shape[0]

    @property
    def has_negative(self) -> bool:
        """True when the unconditional embeddings for guidance are present."""
        return self.negative_prompt_embeds is not None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Cond:
        """A copy with every tensor moved to ``device`` (and floating tensors to ``dtype``)."""
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device=device, dtype=dtype if dtype is not None else v.dtype)
            moved[f.name] = v
        return Cond(**moved)

    def select(self, index: torch.Tensor | list[int]) -> Cond:
        """The conditioning of the prompts at ``index`` (a subset or a reordering)."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.prompt_embeds.device)
        neg = self.negative_prompt_embeds
        negp = self.negative_pooled
        return Cond(
            self.prompt_embeds[idx],
            self.pooled[idx],
            None if neg is None else neg[idx],
            None if negp is None else negp[idx],
            tuple(self.prompts[i] for i in idx.tolist()) if self.prompts else (),
        )


def repeat_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B, ...) -> (B*k, ...) with each row repeated k times consecutively.

    For B == 1 this is a stride-0 view (no copy); otherwise ``repeat_interleave`` copies,
    because a merged (B*k) axis cannot be expressed with strides.
    """
    if k == 1:
        return x
    if x.shape[0] == 1:
        return x.expand(k, *x.shape[1:])
    return x.repeat_interleave(k, dim=0)


def decoder_unscaling(decoder_config: Any) -> tuple[float, float]:
    """(scaling, shift) that turn a diffusion-space latent into what ``decoder`` reads:
    ``latent / scaling + shift``, the two values of the decoder's own config
    (``scaling_factor``, default 1; ``shift_factor``, default 0).

    The one rule for every decoder, as diffusers' SD3 pipeline applies it before
    ``vae.decode``: SD3.5's VAE (scaling 1.5305, shift 0.0609) wants the latent un-scaled,
    TAESD3 (an ``AutoencoderTiny``, scaling 1, no shift) reads the diffusion-space latent as it
    is. :func:`smartgrpo_fast.ops.x0_estimate` takes the pair.
    """
    scaling = getattr(decoder_config, "scaling_factor", None)
    shift = getattr(decoder_config, "shift_factor", None)
    return (1.0 if scaling is None else float(scaling)), (0.0 if shift is None else float(shift))


def has_preview_decoder(model: Any) -> bool:
    """True when ``model`` decodes the search's one-step estimates with a cheaper decoder than
    its final images (``model.preview_decoder`` set, e.g. TAESD3 beside SD3's VAE)."""
    return getattr(model, "preview_decoder", None) is not None


def preview_unscaling(model: Any) -> tuple[float, float]:
    """(scaling, shift) of :func:`decoder_unscaling` for the decoder that reads the search's
    estimates: the model's ``preview_unscaling()`` when it has one, else its
    ``scaling_factor`` and ``shift_factor`` (1 and 0 when absent: pixel-space models)."""
    fn = getattr(model, "preview_unscaling", None)
    if callable(fn):
        return fn()
    return float(getattr(model, "scaling_factor", 1.0)), float(getattr(model, "shift_factor", 0.0))


def preview_decode(model: Any, x0: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """Images in [0, 1] of the search's estimates ``x0`` (already in the scale of
    :func:`preview_unscaling`): ``model.decode_preview`` when the model has it, else
    ``model.decode``; ``size`` resizes them (a reward's input size)."""
    fn = getattr(model, "decode_preview", None) or model.decode
    return fn(x0) if size is None else fn(x0, size=size)


def decode_latents(model: Any, latents: torch.Tensor) -> torch.Tensor:
    """Images of latents in the model's own (VAE-scaled) space, e.g. the end of a sampling
    trajectory: ``model.decode(latents / scaling_factor + shift_factor)`` (SD3: 1.5305 and
    0.0609, as diffusers' pipeline and Flow-GRPO un-scale before the VAE; 1 and 0 when the
    model has none). ``model.decode`` itself takes latents already un-scaled."""
    scaling = float(getattr(model, "scaling_factor", 1.0))
    shift = float(getattr(model, "shift_factor", 0.0))
    if scaling != 1.0 or shift != 0.0:
        latents = latents / scaling + shift
    return model.decode(latents)


@runtime_checkable
class FlowModel(Protocol):
    """What the noise search and the trainer need from a flow-matching text-to-image model."""

    latent_shape: tuple[int, int, int]
    """(C, H, W) of one latent."""

    def encode_prompts(self, prompts: list[str]) -> Cond:
        """Conditioning for B prompts."""
        ...

    def velocity(
        self, z: torch.Tensor, t: float | torch.Tensor, cond: Cond, k: int = 1
    ) -> torch.Tensor:
        """v_theta(z, t): z (B*k, C, H, W), t flow time (float or (B*k,)); cond for B prompts,
        each serving k consecutive rows of z. Returns v like z (shape and dtype)."""
        ...

    def decode(self, x0_latent: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], (N, 3, H_img, W_img) float32, from latents already un-scaled."""
        ...


class DiTFlowModel:
    """Velocity of a diffusers ``SD3Transformer2DModel``, shared by the SD3 and tiny adapters.

    Subclasses set ``transformer``, ``device``, ``dtype``, ``latent_shape``, ``guidance_scale``
    and ``_forward`` (a :class:`~smartgrpo_fast.graphs.GraphedCallable` over
    :meth:`_transformer_forward`). The flow time ``t`` becomes diffusers' timestep ``1000 t``.
    """

    transformer: Any
    device: torch.device
    dtype: torch.dtype
    latent_shape: tuple[int, int, int]
    guidance_scale: float
    _forward: Callable[..., torch.Tensor]

    def _transformer_forward(
        self, z: torch.Tensor, timestep: torch.Tensor, ehs: torch.Tensor, pooled: torch.Tensor
    ) -> torch.Tensor:
        return self.transformer(
            hidden_states=z,
            encoder_hidden_states=ehs,
            pooled_projections=pooled,
            timestep=timestep,
            return_dict=False,
        )[0]

    def velocity(
        self, z: torch.Tensor, t: float | torch.Tensor, cond: Cond, k: int = 1
    ) -> torch.Tensor:
        """v_theta(z, t) for z: (B*k, C, H, W); t: flow time, a float or (B*k,) tensor.

        Each of cond's B prompts serves k consecutive rows of z. With guidance on, the
        unconditional and conditional halves run in one batch of 2*B*k. Returns v in z's dtype.
        """
        n = z.shape[0]
        if z.dim() != 4 or tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(
                f"z: expected (B*k, {', '.join(map(str, self.latent_shape))}), "
                f"got shape {tuple(z.shape)}"
            )
        if k < 1 or n != cond.batch * k:
            raise ValueError(
                f"z: expected B*k = {cond.batch}*{k} = {cond.batch * k} rows, got {n} "
                f"(cond has B = {cond.batch} prompts, k = {k})"
            )
        timestep = self._timesteps(t, n)
        zz = z.to(self.dtype)
        ehs = repeat_rows(cond.prompt_embeds, k)
        pooled = repeat_rows(cond.pooled, k)
        g = self.guidance_scale
        if g > 1.0:
            if not cond.has_negative:
                raise ValueError("cond: guidance_scale > 1 needs negative embeddings; encode again")
            ehs = torch.cat([repeat_rows(cond.negative_prompt_embeds, k), ehs])
            pooled = torch.cat([repeat_rows(cond.negative_pooled, k), pooled])
            zz = torch.cat([zz, zz])
            timestep = torch.cat([timestep, timestep])
        v = self._forward(zz, timestep, ehs, pooled)
        if g > 1.0:
            v_uncond, v_cond = v.chunk(2)
            v = v_uncond + g * (v_cond - v_uncond)
        return v.to(z.dtype)

    def _timesteps(self, t: float | torch.Tensor, n: int) -> torch.Tensor:
        """diffusers' timestep 1000*t as an (n,) float32 tensor on the model's device."""
        if isinstance(t, torch.Tensor):
            if t.dim() == 0:
                t = t.reshape(1).expand(n)
            if t.shape != (n,):
                raise ValueError(
                    f"t: expected a float, a 0-d or ({n},) tensor, got {tuple(t.shape)}"
                )
            return t.to(self.device, torch.float32) * 1000.0
        t = float(t)
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"t: expected a flow time in [0, 1], got {t}")
        return torch.full((n,), 1000.0 * t, device=self.device, dtype=torch.float32)
