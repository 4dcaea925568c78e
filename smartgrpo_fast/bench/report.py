"""What a benchmark shows while and after it runs: progress, text tables, figures.

The figures need matplotlib (``pip install smartgrpo-fast[bench]``) and use the Agg canvas, not
pyplot, so no global backend is touched; matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "align_columns",
    "fmt_number",
    "in_order",
    "new_figure",
    "run_caption",
    "save_figure",
    "with_progress",
]

T = TypeVar("T")


def with_progress(
    items: Sequence[T], describe: Callable[[T], str], *, desc: str, enabled: bool = True
) -> Iterator[T]:
    """Yield ``items``, reporting progress on stderr: a tqdm bar (titled ``desc``, the item's
    ``describe`` beside it) on a terminal when tqdm imports, else one line per item (readable
    in CI logs); nothing when not ``enabled``."""
    if not enabled:
        yield from items
        return
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None or not sys.stderr.isatty():
        for i, item in enumerate(items, 1):
            print(f"[{i}/{len(items)}] {describe(item)}", file=sys.stderr)
            yield item
        return
    with tqdm(total=len(items), desc=desc, unit="case", file=sys.stderr) as bar:
        for item in items:
            bar.set_postfix_str(describe(item))
            yield item
            bar.update(1)


def fmt_number(value: float | None) -> str:
    """Four significant digits (thousands grouped above 1000); ``-`` for a missing value."""
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def in_order(values: Iterable[str], order: Sequence[str]) -> list[str]:
    """The distinct ``values``, known names in ``order`` first, then the others as they came."""
    seen = list(dict.fromkeys(values))
    return [v for v in order if v in seen] + [v for v in seen if v not in order]


def align_columns(lines: Sequence[Sequence[str]], left: Iterable[int] = ()) -> str:
    """``lines`` of cells (the first is the header) as a text table: columns padded to their
    widest cell, right-aligned except the ``left`` ones, a dashed rule under the header."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    left = set(left)
    text = [
        "  ".join(
            cell.ljust(w) if i in left else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def run_caption(row: Mapping[str, Any], suite: str) -> str:
    """Two lines for a figure's title from a row's run metadata: ``smartgrpo_fast <version>
    <suite> on <device name>``, then the torch version, the commit and the date."""
    return (
        f"smartgrpo_fast {row['smartgrpo_fast_version']} {suite} on {row['device_name']}\n"
        f"torch {row['torch_version']}, {row['git_commit']}, {row['date']}"
    )


def new_figure(width: float, height: float) -> Figure:
    """A ``width`` x ``height`` inch matplotlib Figure with constrained layout on the Agg
    canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, png_path: Path | str) -> Path:
    """Write ``fig`` to ``png_path`` (110 dpi), creating its folder; return the path."""
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    return png_path
