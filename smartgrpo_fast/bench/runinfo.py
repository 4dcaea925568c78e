"""Where and with what a benchmark ran: the device, torch, this package and its commit."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from smartgrpo_fast import __version__

__all__ = ["COMMIT_ENV", "RunInfo", "collect_run_info", "device_name", "git_commit"]

#: Environment variable that names the commit of the code under test (see collect_run_info).
COMMIT_ENV = "SMARTGRPO_COMMIT"


@dataclass(frozen=True)
class RunInfo:
    """Where and with what a run was measured; copied into every row."""

    device: str
    device_name: str
    torch_version: str
    smartgrpo_fast_version: str
    git_commit: str
    date: str

    def as_row(self) -> dict[str, str]:
        """The fields as row columns (their names are columns of the CSV schema)."""
        return asdict(self)


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        if line.startswith("model name") and ":" in line:
            return line.split(":", 1)[1].strip()
    return ""


def device_name(device: torch.device) -> str:
    """The GPU's name on CUDA; the CPU model (or ``platform.processor()``, or ``cpu``) else."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_model() or platform.processor() or platform.machine() or "cpu"


def _git(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
    )


def git_commit(path: Path | None = None) -> str:
    """Short commit of the git checkout holding ``path`` (default: this package), ``-dirty``
    when tracked files changed; ``unknown`` outside a checkout or without git."""
    cwd = path if path is not None else Path(__file__).resolve().parent
    try:
        head = _git(["rev-parse", "--short=12", "HEAD"], cwd)
        if head.returncode != 0 or not head.stdout.strip():
            return "unknown"
        status = _git(["status", "--porcelain", "--untracked-files=no"], cwd)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    dirty = status.returncode == 0 and bool(status.stdout.strip())
    return head.stdout.strip() + ("-dirty" if dirty else "")


def collect_run_info(device: torch.device) -> RunInfo:
    """The metadata of a run on ``device``, dated now (UTC, ISO 8601).

    The commit is ``$SMARTGRPO_COMMIT`` (:data:`COMMIT_ENV`) when that is set and not empty,
    else :func:`git_commit` of the checkout holding this package. Set it when the code runs
    from a copy whose git metadata is not its own (a tree copied to a GPU machine inside
    another repository would otherwise report that repository's commit), e.g.
    ``SMARTGRPO_COMMIT=$(git rev-parse --short=12 HEAD)`` taken where the code was committed.
    """
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return RunInfo(
        device=str(device),
        device_name=device_name(device),
        torch_version=torch.__version__,
        smartgrpo_fast_version=__version__,
        git_commit=os.environ.get(COMMIT_ENV, "").strip() or git_commit(),
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
