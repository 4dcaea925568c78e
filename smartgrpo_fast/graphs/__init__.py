"""CUDA-graph capture of static-shape callables, with eager and torch.compile alternatives."""

from smartgrpo_fast.graphs.capture import (
    BACKENDS,
    GraphConfig,
    GraphedCallable,
    GraphStats,
    capture_graph,
    pick_bucket,
    warm_up,
)

__all__ = [
    "BACKENDS",
    "GraphConfig",
    "GraphStats",
    "GraphedCallable",
    "capture_graph",
    "pick_bucket",
    "warm_up",
]
