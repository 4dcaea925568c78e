"""The Smart-GRPO noise search (docs/design.md): CEM over the noise of an SDE step.

* :class:`NoiseSearch` — the fused search (ops, device state, whole-round CUDA graph);
* :func:`search_reference` — the same algorithm written plainly (oracle and naive baseline);
* :class:`SearchConfig` — its constants; ``strategy="best_of"`` is the best-of-M baseline;
* :func:`compare_noise` — searched vs random vs best-of-M noise on the same rollouts.
"""

from smartgrpo_fast.search.cem import NoiseSearch
from smartgrpo_fast.search.config import RoundStats, SearchConfig, SearchResult
from smartgrpo_fast.search.reference import search_reference
from smartgrpo_fast.search.rollout import Comparison, RolloutConfig, compare_noise, paired_stats

__all__ = [
    "Comparison",
    "NoiseSearch",
    "RolloutConfig",
    "RoundStats",
    "SearchConfig",
    "SearchResult",
    "compare_noise",
    "paired_stats",
    "search_reference",
]
