"""The reward protocol, prepared prompts, and the input checks every reward shares.

A reward may split its call in two (:class:`PreparedReward`): ``prepare(prompts)`` turns the
prompts into device tensors (token ids, targets, text embeddings) once, outside any CUDA graph,
and ``score(images, prepared)`` reads only tensors, so it can run inside a captured search
round whose prompts change from call to call (the search copies the prepared tensors into the
graph's static buffers). ``reward(images, prompts)`` stays ``score(images, prepare(prompts))``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

__all__ = [
    "PreparedPrompts",
    "PreparedReward",
    "Reward",
    "check_image_tensor",
    "check_images",
    "check_prepared",
    "prepare_prompts",
    "score_prepared",
]


@runtime_checkable
class Reward(Protocol):
    """A batched reward: images (N, 3, H, W) float in [0, 1] and N prompts -> (N,) float32,
    higher is better."""

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor: ...


@dataclass(frozen=True)
class PreparedPrompts:
    """What a reward needs of N prompts, as tensors made before scoring.

    Attributes:
        prompts: the N prompt strings (for logs, and for the parts of a reward that have no
            ``prepare``).
        tensors: name -> tensor on the scoring device, each with leading size N; their shapes
            depend on N only (fixed-length padding), so a graph captured for one batch of
            prompts can be refilled with another.
        complete: True when ``score`` reads nothing prompt-dependent besides ``tensors`` (so a
            captured graph may be replayed for other prompts after refilling them).
    """

    prompts: tuple[str, ...]
    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)
    complete: bool = True

    def __len__(self) -> int:
        return len(self.prompts)

    def with_tensors(self, tensors: Mapping[str, torch.Tensor]) -> PreparedPrompts:
        """The same prompts with other tensors of the same names (e.g. static buffers)."""
        if set(tensors) != set(self.tensors):
            raise ValueError(
                f"tensors: expected the names {sorted(self.tensors)}, got {sorted(tensors)}"
            )
        return PreparedPrompts(self.prompts, dict(tensors), self.complete)

    def part(self, prefix: str) -> PreparedPrompts:
        """The tensors named ``prefix + name``, renamed ``name`` (a component's share)."""
        sub = {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}
        return PreparedPrompts(self.prompts, sub, self.complete)

    def signature(self) -> tuple:
        """(name, shape, dtype, device) of every tensor, sorted: equal signatures can share
        static buffers."""
        items = sorted(self.tensors.items())
        return (*((k, tuple(v.shape), v.dtype, v.device) for k, v in items), self.complete)


@runtime_checkable
class PreparedReward(Protocol):
    """A reward whose prompt-dependent work happens in ``prepare`` (module docstring)."""

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor: ...

    def prepare(
        self, prompts: list[str], device: torch.device | str | None = None
    ) -> PreparedPrompts: ...

    def score(self, images: torch.Tensor, prepared: PreparedPrompts) -> torch.Tensor: ...


def prepare_prompts(
    reward: object, prompts: list[str], device: torch.device | str | None = None
) -> PreparedPrompts:
    """``reward.prepare(prompts, device)`` when the reward has one; otherwise the bare prompts
    with ``complete=False`` (scored by calling the reward with the strings)."""
    if callable(getattr(reward, "prepare", None)) and callable(getattr(reward, "score", None)):
        prepared = reward.prepare(list(prompts), device)
        if not isinstance(prepared, PreparedPrompts):
            raise TypeError(
                f"reward: prepare returned {type(prepared).__name__}, expected PreparedPrompts"
            )
        return prepared
    return PreparedPrompts(tuple(prompts), {}, complete=False)


def score_prepared(reward: object, images: torch.Tensor, prepared: PreparedPrompts) -> torch.Tensor:
    """``reward.score(images, prepared)`` when the reward has one, else
    ``reward(images, prompts)``."""
    if callable(getattr(reward, "score", None)) and callable(getattr(reward, "prepare", None)):
        return reward.score(images, prepared)
    return reward(images, list(prepared.prompts))  # type: ignore[operator]


def check_prepared(images: object, prepared: object) -> None:
    """:func:`check_images` for ``score``: ``prepared`` is PreparedPrompts of N prompts."""
    if not isinstance(prepared, PreparedPrompts):
        raise TypeError(f"prepared: expected PreparedPrompts, got {type(prepared).__name__}")
    check_images(images, list(prepared.prompts))
    n = len(prepared.prompts)
    for name, t in prepared.tensors.items():
        if t.dim() == 0 or t.shape[0] != n:
            raise ValueError(
                f"prepared: tensor {name!r} has shape {tuple(t.shape)}, expected leading size {n}"
            )


def check_images(images: object, prompts: object, *, allow_nan: bool = False) -> None:
    """Raise a clear error unless ``images`` is (N, 3, H, W) float in [0, 1] without NaN
    (NaN allowed with ``allow_nan``: the range is then checked on the other values) and
    ``prompts`` is a list of N strings. Values are not read while a CUDA graph is captured."""
    _check_layout(images)
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts: expected a list of strings, got {type(prompts).__name__}")
    if len(prompts) != images.shape[0]:
        raise ValueError(
            f"prompts: expected {images.shape[0]} prompts (one per image), got {len(prompts)}"
        )
    _check_values(images, allow_nan)


def check_image_tensor(images: object, *, allow_nan: bool = False) -> None:
    """:func:`check_images` for images without prompts."""
    _check_layout(images)
    _check_values(images, allow_nan)


def _check_layout(images: object) -> None:
    if not isinstance(images, torch.Tensor) or not images.dtype.is_floating_point:
        got = f"{type(images).__name__}" + (
            f" of dtype {images.dtype}" if isinstance(images, torch.Tensor) else ""
        )
        raise TypeError(f"images: expected a float tensor (N, 3, H, W) in [0, 1], got {got}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected shape (N, 3, H, W), got {tuple(images.shape)}")


def _check_values(images: torch.Tensor, allow_nan: bool) -> None:
    if images.is_cuda and torch.cuda.is_current_stream_capturing():
        return  # value checks read the tensor (a sync): not allowed while capturing a graph
    if not images.numel():
        return
    nan = torch.isnan(images)
    if bool(nan.any()):
        if not allow_nan:
            raise ValueError(f"images: {int(nan.sum())} NaN values")
        images = images.masked_fill(nan, 0.5)  # the range of the other values
    lo, hi = float(images.min()), float(images.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"images: expected values in [0, 1], got range [{lo:.4g}, {hi:.4g}]")
