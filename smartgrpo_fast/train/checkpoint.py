"""Atomic checkpoints of a training run and finding the newest complete one.

``RUN/checkpoints/step-NNNNNN/`` holds ``adapter/`` (peft's ``save_pretrained`` format; with
full fine-tuning ``transformer.safetensors`` instead), ``training_state.pt`` (step, optimizer,
EMA, RNG states and the run's identity; read with ``torch.load(weights_only=True)``) and a
``COMPLETE`` file written last. Everything is written into a temporary sibling folder that is
renamed into place, so a run killed at any moment leaves either a complete checkpoint or none
(a leftover temporary folder is ignored and removed by the next save).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "COMPLETE",
    "STATE_FILE",
    "checkpoint_path",
    "complete_checkpoints",
    "latest_checkpoint",
    "load_state",
    "save_checkpoint",
]

COMPLETE = "COMPLETE"
STATE_FILE = "training_state.pt"
_NAME = re.compile(r"^step-(\d{6,})$")


def checkpoint_path(run: str | Path, step: int) -> Path:
    """``RUN/checkpoints/step-NNNNNN`` (6 digits, more past 999999)."""
    return Path(run) / "checkpoints" / f"step-{step:06d}"


def complete_checkpoints(run: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint of ``run``, oldest first."""
    root = Path(run) / "checkpoints"
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = _NAME.match(p.name)
            if m and p.is_dir() and (p / COMPLETE).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run: str | Path) -> tuple[int, Path] | None:
    """The newest complete checkpoint (incomplete ones are ignored), or None."""
    found = complete_checkpoints(run)
    return found[-1] if found else None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run: str | Path,
    step: int,
    *,
    write_weights: Callable[[Path], None],
    state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write checkpoint ``step`` atomically and keep the newest ``keep_last`` complete ones.

    ``write_weights(folder)`` writes the trained weights into the temporary checkpoint folder;
    ``state`` must hold only what ``torch.load(weights_only=True)`` reads back (tensors,
    numbers, strings, lists, dicts).
    """
    root = Path(run) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = checkpoint_path(run, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    write_weights(tmp)
    torch.save(state, tmp / STATE_FILE)
    with open(tmp / COMPLETE, "w") as f:
        f.write(f"step {step}\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for _, old in complete_checkpoints(run)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(folder: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The training state of a checkpoint folder (``torch.load(weights_only=True)``)."""
    f = Path(folder) / STATE_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{f}: not found; is {folder} a complete checkpoint?")
    return torch.load(f, map_location=device, weights_only=True)
