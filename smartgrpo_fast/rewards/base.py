"""The reward protocol and the input checks every reward shares."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

__all__ = ["Reward", "check_images"]


@runtime_checkable
class Reward(Protocol):
    """A batched reward: images (N, 3, H, W) float in [0, 1] and N prompts -> (N,) float32,
    higher is better."""

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor: ...


def check_images(images: object, prompts: object) -> None:
    """Raise a clear error unless ``images`` is (N, 3, H, W) float in [0, 1] without NaN and
    ``prompts`` is a list of N strings. Values are not read while a CUDA graph is captured."""
    if not isinstance(images, torch.Tensor) or not images.dtype.is_floating_point:
        got = f"{type(images).__name__}" + (
            f" of dtype {images.dtype}" if isinstance(images, torch.Tensor) else ""
        )
        raise TypeError(f"images: expected a float tensor (N, 3, H, W) in [0, 1], got {got}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected shape (N, 3, H, W), got {tuple(images.shape)}")
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts: expected a list of strings, got {type(prompts).__name__}")
    if len(prompts) != images.shape[0]:
        raise ValueError(
            f"prompts: expected {images.shape[0]} prompts (one per image), got {len(prompts)}"
        )
    if images.is_cuda and torch.cuda.is_current_stream_capturing():
        return  # value checks read the tensor (a sync): not allowed while capturing a graph
    if images.numel():
        if bool(torch.isnan(images).any()):
            raise ValueError(f"images: {int(torch.isnan(images).sum())} NaN values")
        lo, hi = float(images.min()), float(images.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"images: expected values in [0, 1], got range [{lo:.4g}, {hi:.4g}]")
