"""The README and docs/: their commands and examples are the ones that work, and every measured
figure names the command and the commit that produce it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PAGES = {p: p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
_COMMIT = re.compile(r"\b[0-9a-f]{7,40}\b")
#: A measured figure: a ratio, a share, a time, a rate, a t statistic or an error bound.
_FIGURE = re.compile(
    r"\d(\.\d+)?(e-?\d+)?\s?(x\b|%|ms\b|µs\b|s\b|GB/s|TB/s|/s\b)|\bt\s?[-−]?\d|= \d"
)
_COMMAND = re.compile(r"`(smartgrpo-fast|python3?|bench|torchrun|DEADLINE=|ONLY=)[^`]*`")


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def _paragraphs(text: str) -> list[str]:
    """Prose paragraphs (code blocks removed), blank-line separated."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    paras = [p for p in re.split(r"\n\s*\n", prose) if p.strip()]
    return [p for p in paras if not all(ln.startswith("    ") for ln in p.splitlines() if ln)]


def test_ci_runs_the_readme_test_command() -> None:
    commands = [b.strip() for b in _blocks(README, "bash")[:2]]
    assert "smartgrpo_fast search" in commands[0]  # the main job
    assert "pytest" in commands[1]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_readme_is_one_screen_of_start_and_points_only_inside_the_repo() -> None:
    assert len(README.splitlines()) <= 200
    assert README.index("Run the main job") < 1500  # what and why, then the two commands
    for page, text in PAGES.items():
        assert "../shared" not in text, page.name
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if not target.startswith(("http://", "https://")):
                assert (page.parent / target).exists(), f"{page.name}: link to {target}"


_PY = [(page, i) for page, text in PAGES.items() for i in range(len(_blocks(text, "python")))]


@pytest.mark.parametrize("page, index", _PY, ids=[f"{p.name}-{i}" for p, i in _PY])
def test_python_examples_run(page: Path, index: int) -> None:
    block = _blocks(PAGES[page], "python")[index]
    exec(compile(block, str(page.relative_to(ROOT)), "exec"), {})


def test_the_three_uses_have_an_example_each() -> None:
    for heading in ("## 1. Benchmark the search", "## 2. Call the fused ops", "## 3. Train"):
        section = README.split(heading, 1)[1].split("\n## ", 1)[0]
        assert "```" in section, heading


@pytest.mark.parametrize("page", list(PAGES), ids=[p.name for p in PAGES])
def test_every_measured_figure_names_its_command_and_commit(page: Path) -> None:
    for para in _paragraphs(PAGES[page]):
        if re.search(r"\bmeasured\b", para, flags=re.I) and _FIGURE.search(para):
            where = f"{page.name}: {para[:120]!r}"
            assert _COMMIT.search(para), f"no commit in {where}"
            assert _COMMAND.search(para), f"no command in {where}"
