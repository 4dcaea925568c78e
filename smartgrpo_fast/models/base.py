"""The flow-model protocol that the search and the trainer see, and its conditioning type.

Flow time convention (SD3): ``x_t = (1 - t) x0 + t eps``, ``t`` in [0, 1], 1 = pure noise,
velocity ``v = eps - x0``. Adapters convert ``t`` to their model's own timestep convention;
nothing above them sees it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Protocol, runtime_checkable

import torch

__all__ = ["Cond", "FlowModel", "repeat_rows"]


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
