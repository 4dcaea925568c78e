"""The README's commands and examples are the ones that work."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_test_command() -> None:
    commands = [b.strip() for b in _blocks("bash")[:2]]
    assert "smartgrpo_fast search" in commands[0]  # the main job
    assert "pytest" in commands[1]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("marker", ["NoiseSearch(", 'models.load("tiny")  # the embedded'])
def test_python_example_runs(marker: str) -> None:
    block = next(b for b in _blocks("python") if marker in b)
    exec(compile(block, "README.md", "exec"), {})
