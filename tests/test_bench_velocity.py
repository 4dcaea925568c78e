"""The velocity benchmark (eager vs graph vs compile) runs on the tiny model on CPU."""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")

from smartgrpo_fast.bench.velocity import (
    VelocityBenchConfig,
    format_velocity_table,
    run,
)


def test_rows_for_every_backend_and_batch() -> None:
    cfg = VelocityBenchConfig(backends=("eager", "graph"), batches=(1, 3), repeats=1, warmup=1)
    with pytest.warns(RuntimeWarning, match="not CUDA tensors"):
        rows = run(cfg)
    times = [(r["provider"], r["x"]) for r in rows if r["metric"] == "time"]
    assert times == [("eager", 1), ("eager", 3), ("graph", 1), ("graph", 3)]
    speedups = [r for r in rows if r["metric"] == "speedup"]
    assert [(r["provider"], r["x"]) for r in speedups] == [("graph", 1), ("graph", 3)]
    assert all(r["median"] > 0 for r in rows)
    table = format_velocity_table(rows)
    assert "eager" in table and "graph" in table and "cand/s" in table


@pytest.mark.parametrize(
    "kwargs,match",
    [({"backends": ("cuda-graph",)}, "backends"), ({"batches": (0,)}, "batches")],
)
def test_config_errors(kwargs, match) -> None:
    with pytest.raises(ValueError, match=f"^{match}:"):
        VelocityBenchConfig(**kwargs)
