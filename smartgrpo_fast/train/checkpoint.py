"""Atomic checkpoints of a training run and finding the newest complete one.

``RUN/checkpoints/step-NNNNNN/`` holds ``adapter/`` (peft's ``save_pretrained`` format; with
full fine-tuning ``transformer.safetensors`` instead), ``training_state.pt`` (step, optimizer,
EMA, RNG states and the run's identity; read with ``torch.load(weights_only=True)``) and a
``COMPLETE`` file written last. Everything is written into a temporary sibling folder that is
renamed into place, so a run killed at any moment leaves either a complete checkpoint or none
(a leftover temporary folder is ignored and removed by the next save).

A checkpoint can still be damaged afterwards (a full disk, a copy cut short, a truncated
file): :func:`read_checkpoint` reads every file a resume needs before anything is applied and
raises :class:`CheckpointError` naming the first file that does not load, so a resume can fall
back to an older checkpoint (:func:`newest_readable_checkpoint`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "COMPLETE",
    "STATE_FILE",
    "CheckpointError",
    "ReadCheckpoint",
    "checkpoint_path",
    "complete_checkpoints",
    "latest_checkpoint",
    "load_state",
    "newest_readable_checkpoint",
    "read_checkpoint",
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


class CheckpointError(OSError):
    """A checkpoint file that does not load; the message starts with the file's path."""


@dataclass(frozen=True)
class ReadCheckpoint:
    """A checkpoint whose every file loaded: its ``step``, ``folder`` and training ``state``."""

    step: int
    folder: Path
    state: dict[str, Any]


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else 'no message'}"


def _files_to_read(folder: Path) -> Iterator[Path]:
    """The weight and config files of a checkpoint folder (adapter/, adapter_ema/,
    transformer.safetensors), in a fixed order."""
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        yield from sorted(f for f in sub.iterdir() if f.suffix in (".safetensors", ".json"))
    yield from sorted(folder.glob("*.safetensors"))


def read_checkpoint(
    folder: str | Path, device: torch.device | str = "cpu", *, step: int | None = None
) -> ReadCheckpoint:
    """Load ``folder``'s training state and read every weight and config file in it.

    Nothing is applied to a model: this only proves that a resume from ``folder`` will not
    fail half-way. ``training_state.pt`` is loaded with ``torch.load(weights_only=True)``,
    each ``*.safetensors`` file read whole (a truncated file fails here, not in the middle of
    ``load_adapter``), each ``*.json`` parsed.

    Raises:
        CheckpointError: the first file that is missing or does not load, with the reason.
    """
    folder = Path(folder)
    f = folder / STATE_FILE
    if not f.is_file():
        raise CheckpointError(f"{f}: not found")
    try:
        state = torch.load(f, map_location=device, weights_only=True)
    except Exception as err:  # torch raises RuntimeError, EOFError or UnpicklingError
        raise CheckpointError(f"{f}: does not load ({_first_line(err)})") from err
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{f}: not a training state (no 'step')")
    from safetensors.torch import load_file

    for path in _files_to_read(folder):
        try:
            if path.suffix == ".json":
                json.loads(path.read_text())
            else:
                load_file(path)
        except Exception as err:  # SafetensorError, JSONDecodeError, OSError
            raise CheckpointError(f"{path}: does not load ({_first_line(err)})") from err
    if step is None:
        step = int(state["step"])
    return ReadCheckpoint(step=step, folder=folder, state=state)


def newest_readable_checkpoint(
    run: str | Path,
    device: torch.device | str = "cpu",
    *,
    warn: Callable[[str], None] | None = None,
) -> ReadCheckpoint:
    """The newest complete checkpoint of ``run`` whose files all load (:func:`read_checkpoint`).

    A damaged newer one is skipped with ``warn("<file>: ... ; resuming from <older>")``.

    Raises:
        FileNotFoundError: ``run`` has no complete checkpoint.
        CheckpointError: none of them loads; the message names each damaged file.
    """
    found = complete_checkpoints(run)
    if not found:
        raise FileNotFoundError(f"resume: {run} has no complete checkpoint")
    damaged: list[str] = []
    for step, folder in reversed(found):
        try:
            read = read_checkpoint(folder, device, step=step)
        except CheckpointError as err:
            damaged.append(str(err))
            continue
        if warn is not None:
            for line in damaged:
                warn(f"{line}; skipped: resuming from {folder}")
        return read
    raise CheckpointError(f"resume: no checkpoint of {run} loads: " + "; ".join(damaged))
