"""Device helpers shared by the ops, the graph capture and the benchmarks.

* :func:`is_capturing`: whether a CUDA graph is being captured on ``device``'s current stream
  (value checks that read a tensor, host copies and synchronisation must not run then).
* :func:`same_device`: device equality that reads ``cuda`` as the current CUDA device, as a
  tensor made with ``device="cuda"`` does (``torch.device`` equality says ``cuda`` and
  ``cuda:0`` differ).
"""

from __future__ import annotations

import torch

__all__ = ["is_capturing", "same_device"]


def is_capturing(device: torch.device) -> bool:
    """True while a CUDA graph is being captured on the current stream of ``device``."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _device_index(device: torch.device) -> int | None:
    """``device``'s index, the current one of its kind when it names none (``cuda`` is the
    current CUDA device)."""
    if device.index is not None or device.type != "cuda":
        return device.index
    return torch.cuda.current_device()


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether ``a`` and ``b`` are one device: ``cuda`` and ``cuda:0`` are when device 0 is
    the current one."""
    return a == b or (a.type == b.type and _device_index(a) == _device_index(b))
