"""CUDA-graph capture of static-shape callables, with eager and torch.compile alternatives."""

from smartgrpo_fast.graphs.capture import (
    BACKENDS,
    GraphConfig,
    GraphedCallable,
    GraphStats,
    pick_bucket,
)

__all__ = ["BACKENDS", "GraphConfig", "GraphStats", "GraphedCallable", "pick_bucket"]
