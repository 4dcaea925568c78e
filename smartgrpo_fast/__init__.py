"""smartgrpo_fast: fast Smart-GRPO for flow-matching text-to-image models.

The fused ops live in :mod:`smartgrpo_fast.ops`; the most used are re-exported here.
"""

from smartgrpo_fast.ops import (
    cem_update,
    philox_normal,
    sample_perturb,
    topk_select,
    x0_estimate,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "cem_update",
    "philox_normal",
    "sample_perturb",
    "topk_select",
    "x0_estimate",
]
