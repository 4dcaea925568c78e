"""The rows every benchmark writes: one per measurement, in one schema, to CSV and JSON.

A row has the :data:`CSV_FIELDS` columns: what was measured (op, provider, mode, metric, unit,
the size ``x`` and its name, the case's shape and dtype), the median, p20 and p80 over the
timed calls, and the run's metadata (:class:`~smartgrpo_fast.bench.runinfo.RunInfo`). Plots are
drawn from the CSV, never from memory: :func:`read_csv` gives the rows back with their numbers.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from smartgrpo_fast.bench.case import OpCase, dtype_name
from smartgrpo_fast.bench.runinfo import RunInfo
from smartgrpo_fast.bench.timing import Timing

__all__ = [
    "CSV_FIELDS",
    "measurement_rows",
    "ordered_row",
    "ratio_row",
    "read_csv",
    "write_csv",
    "write_json",
]

#: Columns of the CSV (and keys of each JSON row), in order.
CSV_FIELDS: tuple[str, ...] = (
    "op",
    "provider",
    "mode",
    "metric",
    "unit",
    "x_name",
    "x",
    "k",
    "latent",
    "elites",
    "dtype",
    "median",
    "p20",
    "p80",
    "repeats",
    "device",
    "device_name",
    "torch_version",
    "smartgrpo_fast_version",
    "git_commit",
    "date",
)
_INT_FIELDS = ("x", "k", "elites", "repeats")
_FLOAT_FIELDS = ("median", "p20", "p80")
_MODE = "forward"  # no autograd in any call timed through measurement_rows


def ordered_row(row: Mapping[str, Any]) -> dict:
    """The :data:`CSV_FIELDS` of ``row``, in order (KeyError when one is missing)."""
    return {name: row[name] for name in CSV_FIELDS}


def _gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9 if ms > 0 else math.inf


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.inf


def measurement_rows(
    case: OpCase, timing: Timing, info: RunInfo, repeats: int, mode: str = _MODE
) -> list[dict]:
    """The ``time`` (ms) and ``bandwidth`` (GB/s, from ``case.min_bytes``) rows of a case;
    ``mode`` says how it was timed (``forward`` by default; the ops suite writes ``eager`` or
    ``kernel``)."""
    base = {
        "op": case.op,
        "provider": case.provider,
        "mode": mode,
        "x_name": "K*D",
        "x": case.shape.elements,
        "k": case.shape.k,
        "latent": "x".join(str(s) for s in case.shape.latent),
        "elites": case.shape.elites,
        "dtype": dtype_name(case.dtype),
        "repeats": repeats,
        **info.as_row(),
    }
    nbytes = case.min_bytes
    time_row = {"metric": "time", "unit": "ms", "median": timing.median}
    time_row |= {"p20": timing.p20, "p80": timing.p80}
    bw_row = {"metric": "bandwidth", "unit": "GB/s", "median": _gbps(nbytes, timing.median)}
    # The slower call (p80 time) is the lower bandwidth (p20).
    bw_row |= {"p20": _gbps(nbytes, timing.p80), "p80": _gbps(nbytes, timing.p20)}
    return [ordered_row(base | time_row), ordered_row(base | bw_row)]


def ratio_row(row: Mapping[str, Any], base: Mapping[str, Any], unit: str) -> dict:
    """A ``speedup`` row: ``base``'s time over ``row``'s (> 1: ``row`` is faster); p20/p80 are
    the conservative bounds (base p20 / row p80, base p80 / row p20)."""
    ratios = {
        "median": _ratio(base["median"], row["median"]),
        "p20": _ratio(base["p20"], row["p80"]),
        "p80": _ratio(base["p80"], row["p20"]),
    }
    return {**row, "metric": "speedup", "unit": unit, **ratios}


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path | str) -> Path:
    """Write ``rows`` to a CSV file with the :data:`CSV_FIELDS` header; return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow(ordered_row(row))
    return path


def _json_value(value: Any) -> Any:
    """Non-finite floats (a zero-time call's GB/s) become null: strict JSON has no Infinity."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_json(rows: Sequence[Mapping[str, Any]], path: Path | str) -> Path:
    """Write ``rows`` as a JSON list of objects with the :data:`CSV_FIELDS` keys."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = [{name: _json_value(row[name]) for name in CSV_FIELDS} for row in rows]
    path.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
    return path


def read_csv(path: Path | str) -> list[dict]:
    """Read rows written by :func:`write_csv`, numbers converted back to int/float."""
    with Path(path).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        for name in _INT_FIELDS:
            row[name] = int(row[name])
        for name in _FLOAT_FIELDS:
            row[name] = float(row[name])
    return rows
