"""CUDA-graph capture of static-shape callables, with eager and torch.compile alternatives."""

from smartgrpo_fast.graphs.capture import (
    BACKENDS,
    INNER_COMPILE_MODES,
    GraphConfig,
    GraphedCallable,
    GraphStats,
    capture_graph,
    enclosing_graph,
    in_enclosing_graph,
    pick_bucket,
    warm_up,
)

__all__ = [
    "BACKENDS",
    "INNER_COMPILE_MODES",
    "GraphConfig",
    "GraphStats",
    "GraphedCallable",
    "capture_graph",
    "enclosing_graph",
    "in_enclosing_graph",
    "pick_bucket",
    "warm_up",
]
